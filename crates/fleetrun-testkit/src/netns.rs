//! Hosts with their own addresses: Linux network namespaces on a bridge.
//!
//! ```text
//!   root namespace: bridge fb<tag> 10.213.<n>.1/24   (the controller listens here)
//!        |-- fv<tag>-<i>  ==veth==  eth0 in namespace fh-<tag>-<i>, 10.213.<n>.<10+i>/24
//! ```
//! Each run names everything after its own process id (`<tag>`), so concurrent runs do not meet,
//! and [`Network::remove_stale`] can clear what a killed run left behind. Everything a
//! [`Network`] made is removed when it is dropped.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, Result, bail, ensure};

/// One host: a namespace with one address.
#[derive(Debug, Clone)]
pub struct NetnsHost {
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// The root-namespace end of the host's link; cutting it cuts the host off.
    pub link: String,
}

/// A bridge and the hosts attached to it.
#[derive(Debug)]
pub struct Network {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub hosts: Vec<NetnsHost>,
}

fn run(args: &[&str]) -> Result<()> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

fn tag() -> String {
    format!("{:x}", std::process::id() & 0xffff)
}

impl Network {
    /// Creates a bridge and `count` hosts. Needs root.
    pub fn create(count: usize) -> Result<Self> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "network namespaces need root"
        );
        ensure!(count <= 200, "at most 200 namespace hosts");
        Self::remove_stale();
        let tag = tag();
        // A /24 per run, picked from the process id: 10.213.0.0/16 is used by nothing else here.
        let subnet = (std::process::id() % 250) as u8 + 1;
        let gateway = Ipv4Addr::new(10, 213, subnet, 1);
        let bridge = format!("fb{tag}");
        let mut network = Self {
            bridge: bridge.clone(),
            gateway,
            hosts: Vec::new(),
        };
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for i in 0..count {
            let namespace = format!("fh-{tag}-{i}");
            let link = format!("fv{tag}-{i}");
            let ip = Ipv4Addr::new(10, 213, subnet, 10 + i as u8);
            run(&["ip", "netns", "add", &namespace])?;
            network.hosts.push(NetnsHost {
                namespace: namespace.clone(),
                ip,
                link: link.clone(),
            });
            run(&[
                "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns",
                &namespace,
            ])?;
            run(&["ip", "link", "set", &link, "master", &bridge])?;
            run(&["ip", "link", "set", &link, "up"])?;
            let ns = ["ip", "netns", "exec", namespace.as_str()];
            let inside = |args: &[&str]| run(&[&ns[..], args].concat());
            inside(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            inside(&["ip", "link", "set", "eth0", "up"])?;
            inside(&["ip", "link", "set", "lo", "up"])?;
            inside(&["ip", "route", "add", "default", "via", &gateway.to_string()])?;
        }
        Ok(network)
    }

    /// The command prefix that runs a program inside host `index`.
    pub fn exec_prefix(&self, index: usize) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.hosts[index].namespace.clone(),
        ]
    }

    /// Takes host `index`'s link down (both ways): nothing reaches it or leaves it.
    pub fn cut(&self, index: usize) -> Result<()> {
        run(&["ip", "link", "set", &self.hosts[index].link, "down"])
    }

    /// Brings host `index`'s link back.
    pub fn restore(&self, index: usize) -> Result<()> {
        run(&["ip", "link", "set", &self.hosts[index].link, "up"])
    }

    /// Adds loss and delay on every host's link, in both directions.
    pub fn impair(&self, loss_percent: u32, delay_ms: u32) -> Result<()> {
        let loss = format!("{loss_percent}%");
        let delay = format!("{delay_ms}ms");
        for host in &self.hosts {
            run(&[
                "tc", "qdisc", "replace", "dev", &host.link, "root", "netem", "loss", &loss,
                "delay", &delay,
            ])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &host.namespace,
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "netem",
                "loss",
                &loss,
                "delay",
                &delay,
            ])?;
        }
        Ok(())
    }

    /// Removes loss and delay from every link.
    pub fn heal(&self) {
        for host in &self.hosts {
            quiet(&["tc", "qdisc", "del", "dev", &host.link, "root"]);
            quiet(&[
                "ip",
                "netns",
                "exec",
                &host.namespace,
                "tc",
                "qdisc",
                "del",
                "dev",
                "eth0",
                "root",
            ]);
        }
    }

    /// Removes namespaces, links and bridges of earlier runs whose process is gone.
    pub fn remove_stale() {
        let alive = |tag: &str| {
            u32::from_str_radix(tag, 16).is_ok_and(|t| {
                std::fs::read_dir("/proc")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|p| p.parse::<u32>().ok())
                            .is_some_and(|pid| pid & 0xffff == t)
                    })
            })
        };
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if let Some(rest) = name.strip_prefix("fh-")
                    && !alive(rest.split('-').next().unwrap_or_default())
                {
                    quiet(&["ip", "netns", "del", name]);
                }
            }
        }
        if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line
                    .split(':')
                    .nth(1)
                    .unwrap_or_default()
                    .trim()
                    .split('@')
                    .next()
                    .unwrap_or_default();
                let tag = name.strip_prefix("fb").or_else(|| {
                    name.strip_prefix("fv")
                        .map(|r| r.split('-').next().unwrap_or_default())
                });
                if let Some(tag) = tag
                    && !tag.is_empty()
                    && tag.chars().all(|c| c.is_ascii_hexdigit())
                    && !alive(tag)
                {
                    quiet(&["ip", "link", "del", name]);
                }
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            quiet(&["ip", "link", "del", &host.link]);
            quiet(&["ip", "netns", "del", &host.namespace]);
        }
        quiet(&["ip", "link", "del", &self.bridge]);
    }
}
