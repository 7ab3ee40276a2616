//! A UDP relay between agents and the controller that can lose and delay packets, for when the
//! kernel has no `netem` qdisc. Each agent address gets its own upstream socket, so the
//! controller sees one peer per agent, as without the relay.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use tokio::{net::UdpSocket, task::JoinHandle};

#[derive(Debug, Clone, Copy, Default)]
struct Impairment {
    loss: f64,
    delay: Duration,
}

impl Impairment {
    /// Sends `packet` on `socket` unless it is lost, after the delay.
    fn forward(self, socket: Arc<UdpSocket>, packet: Vec<u8>, to: Option<SocketAddr>) {
        if self.loss > 0.0 && rand::random::<f64>() < self.loss {
            return;
        }
        let send = async move {
            let _ = match to {
                Some(to) => socket.send_to(&packet, to).await,
                None => socket.send(&packet).await,
            };
        };
        if self.delay.is_zero() {
            tokio::spawn(send);
        } else {
            let delay = self.delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                send.await;
            });
        }
    }
}

/// The relay; it stops when dropped.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    impairment: Arc<Mutex<Impairment>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on `listen` and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let addr = front.local_addr()?;
        let impairment = Arc::new(Mutex::new(Impairment::default()));
        let task = tokio::spawn(serve(front, upstream, impairment.clone()));
        Ok(Self {
            addr,
            impairment,
            task,
        })
    }

    /// Loses `loss_percent` of the packets in each direction and delays the rest by `delay_ms`.
    pub fn impair(&self, loss_percent: u32, delay_ms: u64) {
        *self.impairment.lock().unwrap() = Impairment {
            loss: f64::from(loss_percent) / 100.0,
            delay: Duration::from_millis(delay_ms),
        };
    }

    pub fn heal(&self) {
        *self.impairment.lock().unwrap() = Impairment::default();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(front: Arc<UdpSocket>, upstream: SocketAddr, impairment: Arc<Mutex<Impairment>>) {
    let mut sessions: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, client)) = front.recv_from(&mut buf).await else {
            break;
        };
        let socket = match sessions.get(&client) {
            Some((socket, _)) => socket.clone(),
            None => {
                let bind: SocketAddr = if upstream.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                }
                .parse()
                .unwrap();
                let Ok(socket) = UdpSocket::bind(bind).await else {
                    continue;
                };
                if socket.connect(upstream).await.is_err() {
                    continue;
                }
                let socket = Arc::new(socket);
                let back = tokio::spawn(backward(
                    socket.clone(),
                    front.clone(),
                    client,
                    impairment.clone(),
                ));
                sessions.insert(client, (socket.clone(), back));
                socket
            }
        };
        let now = *impairment.lock().unwrap();
        now.forward(socket, buf[..len].to_vec(), None);
    }
    for (_, (_, back)) in sessions {
        back.abort();
    }
}

async fn backward(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    impairment: Arc<Mutex<Impairment>>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match upstream.recv(&mut buf).await {
            Ok(len) => {
                let now = *impairment.lock().unwrap();
                now.forward(front.clone(), buf[..len].to_vec(), Some(client));
            }
            // The controller is down (an ICMP port unreachable came back): it may be started
            // again on the same port, and the agent's packets must then reach it both ways.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(_) => return,
        }
    }
}
