//! The language the fleetrun controller and its agents speak over QUIC.
//!
//! This crate holds the wire messages, the one codec that turns them into bytes, and the framing
//! that delimits them on a stream. It does no I/O and reads no clock, so every decoder of untrusted
//! bytes here can be tested (and fuzzed) in isolation.
//!
//! A connection carries two kinds of streams:
//! - one **control stream**, opened by the agent right after the handshake: [`Hello`] up,
//!   [`HelloReply`] down, then [`ControlUp`] heartbeats for as long as the connection lives
//!   (from version 3 also [`ControlUp::Renew`], answered by a [`ControlDown`]);
//! - one **task stream** per task, opened by the controller: a [`TaskDown::Run`] down, then
//!   [`TaskUp`] events (output chunks while the script runs, a final [`TaskResult`]) up, and an
//!   optional [`TaskDown::Cancel`] down; from version 2, [`TaskDown::ResultStored`] once the
//!   controller has stored the result, and streams that resume ([`TaskDown::Resume`]) or discard
//!   ([`TaskDown::Discard`]) a task the agent reported holding ([`ControlUp::Holding`]);
//!   from version 4, a stream may instead start with [`TaskDown::Place`] (a file task), answered
//!   by [`TaskUp::Started`], one [`TaskUp::FilePlaced`] per file and the result; from version 5,
//!   [`TaskDown::Collect`] (read files on a source host and send them in chunks) or
//!   [`TaskDown::Fetch`] (write files on a target host, pulling each one's chunks); from
//!   version 6, a fetch's file may be wanted from a chunk on ([`TaskUp::WantFrom`]), when the
//!   controller sends a fetch cut by a lost connection again over the next one.

mod codec;
mod enroll;
mod identity;
mod messages;
pub mod source_path;

pub use codec::{DecodeError, EncodeError, FrameDecoder, SharedTaskRequest, encode_frame};
pub use enroll::{
    ENROLL_ALPN, EnrollReply, EnrollRequest, Enrolled, MAX_ENROLL_FRAME, MAX_ENROLL_IPS,
};
pub use identity::{AGENT_URI_PREFIX, agent_id_from_uri, agent_uri, is_valid_agent_id};
pub use messages::*;

/// The QUIC application protocol: the framing and the [`Hello`] exchange, which every revision
/// of the messages keeps decodable. A change that old peers would misread there bumps the number,
/// so mismatched peers fail the TLS handshake instead of misreading frames.
pub const ALPN: &[u8] = b"fleetrun/1";

/// The newest revision of the messages inside [`ALPN`]. The agent sends the newest it speaks in
/// [`Hello`]; a controller answers an agent of version 2 or later with
/// [`HelloReply::Negotiated`] naming the lower of both, and an agent of version 1 with
/// [`HelloReply::Welcome`]; both then speak that version. Version 2 adds reattaching to tasks
/// that outlived their connection; version 3, renewing the agent's certificate over the control
/// stream ([`ControlUp::Renew`], [`ControlDown`]); version 4, file tasks ([`TaskDown::Place`],
/// [`TaskUp::FilePlaced`]), which a controller sends only on a connection that negotiated 4;
/// version 5, files pulled between hosts through the controller ([`TaskDown::Collect`] on a
/// source host, [`TaskDown::Fetch`] on a target), sent only on a connection that negotiated 5;
/// version 6, fetches resumed after a cut ([`TaskUp::WantFrom`]), which a controller does only
/// with an agent that negotiated 6, and [`HelloReply::Joined`], which says whether the
/// controller is one of a cluster.
pub const PROTOCOL_VERSION: u32 = 6;

/// The first protocol version whose fetches go on after a cut ([`TaskUp::WantFrom`]): an agent
/// keeps a cut file's partial only on a connection that negotiated it.
pub const RESUME_PROTOCOL_VERSION: u32 = 6;

/// The oldest agent protocol revision the controller accepts (and the first that has no
/// reattach: its tasks end with their connection).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The SHA-256 of `messages.rs`'s code (comments and blank lines left out) for each protocol
/// version, oldest first. xtask's tidy test recomputes it, so a change to what goes on the wire
/// fails the tests until it comes with a new [`PROTOCOL_VERSION`] and its line here.
pub const WIRE_DIGESTS: &[(u32, &str)] = &[
    (
        1,
        "4baf1af85599ff46787af7f1de8907b8368c5a7c90c27f586c4270327c9f3681",
    ),
    (
        2,
        "66d6b458d97293fec69fcb6ab658bc85b7ab33ae5b1634f836b233cb77eed7a3",
    ),
    (
        3,
        "572f17433da40830bb6e1e215aa6231b8c61e78b2f01c086a862a24fb6ebd468",
    ),
    (
        4,
        "dd9a54b6ac91a405515e4d6373f961643ad64a7697e29df845b72c08c82ce63a",
    ),
    (
        5,
        "3e29887be1883aba8f8d441f5586fb30b242c36c8e8b1b46d69990330faa8212",
    ),
    (
        6,
        "519b9c31b95f3661adb37367c14e4a7c02274ffced6460b6970de909822f9692",
    ),
];

/// Largest frame either side accepts, header excluded. Output arrives in chunks of at most
/// [`MAX_OUTPUT_CHUNK`]; only a task request carrying a large script comes close.
pub const MAX_FRAME_LEN: usize = 24 * 1024 * 1024;

/// Bytes of a file in one [`TaskUp::SourceChunk`] or [`TaskDown::Chunk`] (the last of a file
/// may be shorter). Content-addressed: each chunk is stored and checked by its SHA-256.
pub const FILE_CHUNK: usize = 1024 * 1024;

/// Largest piece of output an agent puts in one [`TaskUp::Output`] frame.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

/// QUIC application error codes used when one side closes the connection deliberately.
pub mod close_code {
    /// The controller refused the agent's hello (identity, version); the reason was sent first.
    pub const REFUSED: u32 = 1;
    /// The peer broke the protocol (undecodable frame, unexpected message).
    pub const PROTOCOL: u32 = 2;
    /// The side is shutting down.
    pub const SHUTDOWN: u32 = 3;
    /// A newer connection of the same agent replaced this one.
    pub const REPLACED: u32 = 4;
    /// An operator revoked the agent: it is refused until the revocation is lifted.
    pub const REVOKED: u32 = 5;
}
