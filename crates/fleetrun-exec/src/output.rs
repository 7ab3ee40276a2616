//! Reading a script's output pipe with bounded memory.
//!
//! The first half of the limit is forwarded as it arrives; everything after
//! goes through a ring buffer holding the other half, so only the last bytes
//! survive. Nothing here waits for the consumer: the channel is unbounded,
//! but at most `output_limit` bytes ever enter it.

use std::io;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Largest single read from the pipe, and largest `Data` event.
const CHUNK: usize = 64 * 1024;

/// A piece of a task's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// Bytes the script wrote to stdout or stderr, interleaved in the order
    /// written, unchanged (not necessarily UTF-8, not split at lines).
    Data(Bytes),
    /// Output was cut here: this many bytes, containing this many newlines,
    /// were dropped between the head already delivered and the tail that
    /// follows. Sent at most once, after the script ended.
    Truncated {
        /// Bytes dropped.
        dropped_bytes: u64,
        /// Newline characters in the dropped bytes.
        dropped_lines: u64,
    },
}

/// The output of one task.
#[derive(Debug)]
pub struct OutputReceiver {
    rx: mpsc::UnboundedReceiver<OutputEvent>,
}

impl OutputReceiver {
    /// The next event; `None` once the last one has been received.
    pub async fn next(&mut self) -> Option<OutputEvent> {
        self.rx.recv().await
    }
}

/// Where a task's output events are sent: the pipe's reader for the executor, the emulation
/// itself for a task run by [`crate::Running::spawn`].
pub type OutputSender = mpsc::UnboundedSender<OutputEvent>;

pub(crate) fn channel() -> (OutputSender, OutputReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, OutputReceiver { rx })
}

/// What the reader counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub output_bytes: u64,
    pub dropped_bytes: u64,
    pub dropped_lines: u64,
}

/// Reads `pipe` until EOF, or until `stop` fires and what is already in the
/// pipe has been drained. `eof` fires when reading is over.
pub(crate) fn spawn_reader(
    mut pipe: pipe::Receiver,
    limit: usize,
    tx: OutputSender,
    eof: CancellationToken,
    stop: CancellationToken,
) -> JoinHandle<Totals> {
    tokio::spawn(async move {
        let mut capture = Capture::new(limit, tx);
        // Filled without being zeroed first: most scripts print a few bytes.
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
        loop {
            buf.clear();
            tokio::select! {
                biased;
                read = pipe.read_buf(&mut buf) => match read {
                    Ok(0) => break,
                    Ok(n) => capture.push(&buf[..n]),
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        tracing::warn!(%err, "cannot read a script's output");
                        break;
                    }
                },
                () = stop.cancelled() => {
                    // Someone outside the tree still holds the pipe; keep
                    // what was written before giving up on it.
                    buf.clear();
                    while let Ok(n @ 1..) = pipe.try_read_buf(&mut buf) {
                        capture.push(&buf[..n]);
                        buf.clear();
                    }
                    break;
                }
            }
        }
        eof.cancel();
        capture.finish()
    })
}

/// Routes bytes to the consumer (head), the ring (tail) and the counters.
#[derive(Debug)]
pub(crate) struct Capture {
    tx: OutputSender,
    head_left: usize,
    head_sent: u64,
    tail: Ring,
    total: u64,
    /// Newlines in every byte that went to the ring, kept or not.
    tail_newlines: u64,
}

impl Capture {
    pub(crate) fn new(limit: usize, tx: OutputSender) -> Self {
        let head = limit / 2;
        Self {
            tx,
            head_left: head,
            head_sent: 0,
            tail: Ring::new(limit - head),
            total: 0,
            tail_newlines: 0,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let (head, rest) = bytes.split_at(bytes.len().min(self.head_left));
        if !head.is_empty() {
            self.head_left -= head.len();
            self.head_sent += head.len() as u64;
            // A closed receiver only means nobody listens any more; keep
            // draining so the script never blocks on a full pipe.
            let _ = self
                .tx
                .send(OutputEvent::Data(Bytes::copy_from_slice(head)));
        }
        if !rest.is_empty() {
            self.tail_newlines += count_newlines(rest);
            self.tail.push(rest);
        }
    }

    /// Sends the cut marker and the tail, and returns the counts.
    pub(crate) fn finish(self) -> Totals {
        let tail = self.tail.into_vec();
        let dropped_bytes = self.total - self.head_sent - tail.len() as u64;
        let dropped_lines = self.tail_newlines - count_newlines(&tail);
        if dropped_bytes > 0 {
            let _ = self.tx.send(OutputEvent::Truncated {
                dropped_bytes,
                dropped_lines,
            });
        }
        let mut tail = Bytes::from(tail);
        while !tail.is_empty() {
            let piece = tail.split_to(tail.len().min(CHUNK));
            let _ = self.tx.send(OutputEvent::Data(piece));
        }
        Totals {
            output_bytes: self.total,
            dropped_bytes,
            dropped_lines,
        }
    }
}

fn count_newlines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

/// The last `cap` bytes pushed. Grows only as far as it is filled, so a
/// short output costs a short buffer.
#[derive(Debug)]
struct Ring {
    buf: Vec<u8>,
    cap: usize,
    /// Oldest byte once `buf` is full.
    start: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            start: 0,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - self.cap..]);
            self.start = 0;
            return;
        }
        if self.buf.len() < self.cap {
            let n = data.len().min(self.cap - self.buf.len());
            let want = (self.buf.len() + n)
                .max(self.buf.capacity() * 2)
                .min(self.cap);
            self.buf.reserve_exact(want - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        while !data.is_empty() {
            let n = data.len().min(self.cap - self.start);
            self.buf[self.start..self.start + n].copy_from_slice(&data[..n]);
            self.start = (self.start + n) % self.cap;
            data = &data[n..];
        }
    }

    fn into_vec(mut self) -> Vec<u8> {
        self.buf.rotate_left(self.start);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_after(cap: usize, pushes: &[&[u8]]) -> Vec<u8> {
        let mut ring = Ring::new(cap);
        for push in pushes {
            ring.push(push);
        }
        ring.into_vec()
    }

    #[test]
    fn ring_keeps_the_last_bytes() {
        assert_eq!(ring_after(4, &[b"ab"]), b"ab");
        assert_eq!(ring_after(4, &[b"ab", b"cd"]), b"abcd");
        assert_eq!(ring_after(4, &[b"ab", b"cde"]), b"bcde");
        assert_eq!(ring_after(4, &[b"abc", b"d", b"e", b"f"]), b"cdef");
        assert_eq!(ring_after(4, &[b"abcdefgh"]), b"efgh");
        assert_eq!(ring_after(4, &[b"a", b"bcdefg", b"hi"]), b"fghi");
        assert_eq!(ring_after(0, &[b"abc"]), b"");
    }

    #[test]
    fn ring_matches_a_naive_model() {
        let mut model = Vec::new();
        let mut ring = Ring::new(7);
        for i in 0..200u32 {
            let piece: Vec<u8> = (0..(i * 7 % 11)).map(|j| (i + j) as u8).collect();
            ring.push(&piece);
            model.extend_from_slice(&piece);
        }
        let keep = model.len().min(7);
        assert_eq!(ring.into_vec(), model[model.len() - keep..]);
    }

    fn capture(limit: usize, pushes: &[&[u8]]) -> (Vec<OutputEvent>, Totals) {
        let (tx, mut rx) = channel();
        let mut capture = Capture::new(limit, tx);
        for push in pushes {
            capture.push(push);
        }
        let totals = capture.finish();
        let mut events = Vec::new();
        while let Ok(event) = rx.rx.try_recv() {
            events.push(event);
        }
        (events, totals)
    }

    fn data(bytes: &[u8]) -> OutputEvent {
        OutputEvent::Data(Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn short_output_is_all_kept() {
        let (events, totals) = capture(10, &[b"abc", b"d\nef"]);
        assert_eq!(events, vec![data(b"abc"), data(b"d\n"), data(b"ef")]);
        assert_eq!(
            totals,
            Totals {
                output_bytes: 7,
                ..Totals::default()
            }
        );
    }

    #[test]
    fn long_output_keeps_head_and_tail() {
        let (events, totals) = capture(6, &[b"a\nb", b"\nc\nd\ne", b"\nf\ng"]);
        // Head "a\nb", then "\nc\nd\ne\n" dropped, then tail "f\ng".
        let dropped = OutputEvent::Truncated {
            dropped_bytes: 7,
            dropped_lines: 4,
        };
        assert_eq!(events, vec![data(b"a\nb"), dropped, data(b"f\ng")]);
        assert_eq!(
            totals,
            Totals {
                output_bytes: 13,
                dropped_bytes: 7,
                dropped_lines: 4,
            }
        );
    }

    #[test]
    fn zero_limit_drops_everything() {
        let (events, totals) = capture(0, &[b"x\ny\n"]);
        let dropped = OutputEvent::Truncated {
            dropped_bytes: 4,
            dropped_lines: 2,
        };
        assert_eq!(events, vec![dropped]);
        assert_eq!(totals.output_bytes, 4);
    }
}
