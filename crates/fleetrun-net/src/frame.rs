//! Frames on QUIC streams.

use bytes::Bytes;
use fleetrun_proto::{DecodeError, EncodeError, FrameDecoder, encode_frame};
use serde::{Serialize, de::DeserializeOwned};

/// Reading or writing a framed stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Reading from the stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing to the stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
}

impl StreamError {
    /// The connection-level error behind a stream error, if that is what it is.
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            Self::Read(quinn::ReadError::ConnectionLost(e))
            | Self::Write(quinn::WriteError::ConnectionLost(e)) => Some(e),
            _ => None,
        }
    }
}

/// The receiving half of a stream, yielding whole messages.
#[derive(Debug)]
pub struct FramedRecv {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FramedRecv {
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly.
    ///
    /// Cancel-safe: the future may be dropped at any await (in a `select!`, a timeout) without
    /// losing data. Bytes read of a frame not yet whole stay in this receiver's decoder, and
    /// quinn's `read_chunk` is itself cancel-safe, so the next call returns the whole frame.
    /// The agent's task stream relies on this to wait for the controller beside its own work.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(msg) = self.decoder.decode()? {
                return Ok(Some(msg));
            }
            match self.stream.read_chunk(usize::MAX, true).await? {
                Some(chunk) => self.decoder.extend(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(code.into());
    }
}

/// Writes one message as a frame.
pub async fn send_frame<T: Serialize>(
    stream: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), StreamError> {
    let frame: Bytes = encode_frame(msg)?;
    stream.write_chunk(frame).await?;
    Ok(())
}

/// An operator-readable account of why a connection ended, naming authentication failures as such.
///
/// With TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate, so a refused certificate shows up as the connection closing with a TLS alert on
/// the first stream, not as a failed `connect()`.
pub fn describe_connection_error(error: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match error {
        E::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            if (0x100..0x200).contains(&code) {
                let alert = rustls::AlertDescription::from((code - 0x100) as u8);
                format!(
                    "authentication failed: the peer rejected the TLS handshake ({alert:?}); \
                     check that this certificate is signed by the CA the peer trusts"
                )
            } else {
                format!("closed by peer: {close}")
            }
        }
        E::TransportError(e) => {
            let code = u64::from(e.code);
            if (0x100..0x200).contains(&code) {
                format!("authentication failed: {e}")
            } else {
                format!("transport error: {e}")
            }
        }
        E::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            format!("closed by peer (code {}): {reason}", close.error_code)
        }
        E::TimedOut => "timed out: no packet from the peer".to_owned(),
        E::Reset => "reset by peer".to_owned(),
        E::LocallyClosed => "closed locally".to_owned(),
        E::VersionMismatch => "QUIC version mismatch".to_owned(),
        E::CidsExhausted => "connection ids exhausted".to_owned(),
    }
}
