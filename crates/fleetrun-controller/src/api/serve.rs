//! The HTTP server under the API: HTTP/1.1 connections with bounded numbers and times.
//!
//! Connections past `http_max_connections` wait in the listen backlog; a connection that does not
//! deliver a request head within `http_header_timeout_secs` (a slow client, or an idle kept-alive
//! one) is closed. Bodies, and how many requests are served at once, are bounded by
//! [`super::intake`].

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::LimitsConfig;

/// The address of the client a request came from (the TCP peer), in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The most one read from a connection holds (the request head must fit in it too), so the most
/// a body chunk can take an unauthenticated request past its permitted prefix.
pub(crate) const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Serves `app` on `listener` until `shutdown`, then lets open requests finish; over TLS when
/// `tls` is given (the handshake within `http_header_timeout_secs`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: LimitsConfig,
    tls: Option<Arc<crate::tls_api::ApiTls>>,
    shutdown: CancellationToken,
) {
    let handshake_timeout = Duration::from_secs(limits.http_header_timeout_secs);
    let connections = Arc::new(Semaphore::new(limits.http_max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.http_header_timeout_secs))
        // A body chunk is a slice of one read: with hyper's default (about 400 KiB) a single
        // chunk could take an unauthenticated request far past the bytes its budget permits.
        .max_buf_size(READ_BUFFER_BYTES);
    let mut open = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => {
                permit.expect("the connection semaphore is never closed")
            }
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // pause rather than spin.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let tagged = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer));
                request
            },
        );
        let http = http.clone();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let shutdown = shutdown.clone();
        open.spawn(async move {
            let _permit = permit;
            let Some(acceptor) = acceptor else {
                let connection =
                    http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(tagged));
                serve_connection(connection, shutdown, peer).await;
                return;
            };
            let stream = tokio::select! {
                accepted = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)) => {
                    match accepted {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake not done in time");
                            return;
                        }
                    }
                }
                () = shutdown.cancelled() => return,
            };
            let connection =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(tagged));
            serve_connection(connection, shutdown, peer).await;
        });
        while open.try_join_next().is_some() {}
    }
    while open.join_next().await.is_some() {}
}

/// Drives one connection; on shutdown, lets its open request finish.
async fn serve_connection<C>(connection: C, shutdown: CancellationToken, peer: std::net::SocketAddr)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + GracefulConnection,
{
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "HTTP connection ended: {e}");
    }
}

/// A hyper connection that can be asked to finish its request and close.
trait GracefulConnection {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self)
    }
}
