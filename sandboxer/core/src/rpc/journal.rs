//! A task connection's journal: the requests read off the connection and
//! not yet answered, and the answers made but not yet known to be written,
//! kept in a memfd that is parked in the holder with the connection. A
//! daemon that restarts after a crash reads it and carries on where its
//! predecessor stopped: unanswered requests are dispatched again, answers
//! already made are written (containerd's client drops an answer it has
//! already had), and a request whose bytes are still in the socket is not
//! counted twice.
//!
//! Layout: a header (magic, start, length), then records from `start`:
//! kind (1 byte), stream id (u32 BE), payload length (u32 BE), payload. A
//! record counts once the header's length covers it: the length is written
//! after the record, in one write within one page, so a process killed
//! half-way leaves the journal as it was before.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

const MAGIC: &[u8; 8] = b"KSJRNL01";
const HEADER: u64 = 4096;
/// Past this size the journal is rewritten with only what is live.
const COMPACT_AT: u64 = 256 * 1024;
/// A payload length no record can have (ttrpc's limit is 4 MiB).
const MAX_RECORD: u32 = 16 << 20;

const REQUEST: u8 = 1;
const RESPONSE: u8 = 2;
const DONE: u8 = 3;
/// The connection is half-way through a frame too large to be read in one
/// piece: its stream cannot be resumed.
const UNSAFE: u8 = 4;
const SAFE: u8 = 5;

/// A request read and not yet answered, and its answer if one was made.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    pub request: Vec<u8>,
    pub response: Option<Vec<u8>>,
}

pub struct Journal {
    file: File,
    start: u64,
    len: u64,
    live: BTreeMap<u32, Entry>,
    unsafe_read: bool,
    /// The furthest byte written since the file was last cut back.
    high: u64,
}

/// What a journal says of its connection.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub entries: BTreeMap<u32, Entry>,
    /// The stream id of the last request recorded (it may still be in the
    /// socket if the daemon died between recording and consuming it).
    pub last_request: Option<u32>,
    /// A frame was being read in pieces: the stream position is unknown.
    pub unsafe_read: bool,
}

impl Journal {
    pub fn create() -> io::Result<Journal> {
        let fd = nix::sys::memfd::memfd_create(
            c"kuasar-conn-journal",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        // SAFETY: memfd_create returned a new descriptor owned by no one else.
        let file = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        let mut j = Journal {
            file,
            start: HEADER,
            len: 0,
            live: BTreeMap::new(),
            unsafe_read: false,
            high: HEADER,
        };
        j.write_header()?;
        Ok(j)
    }

    /// Reads a journal a predecessor kept, and serves on with it.
    pub fn open(fd: OwnedFd) -> io::Result<(Journal, Recovered)> {
        let file = File::from(fd);
        let mut head = [0u8; 24];
        file.read_exact_at(&mut head, 0)?;
        if &head[0..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a connection journal",
            ));
        }
        let start = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u64::from_be_bytes(head[16..24].try_into().unwrap());
        let size = file.metadata()?.len();
        if start < HEADER || start.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "connection journal header out of range",
            ));
        }
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, start)?;
        let rec = parse(&data)?;
        let mut j = Journal {
            file,
            start: HEADER,
            len: 0,
            live: rec.entries.clone(),
            unsafe_read: rec.unsafe_read,
            high: size,
        };
        j.rewrite()?;
        Ok((j, rec))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// How many requests are unanswered.
    pub fn pending(&self) -> usize {
        self.live.len()
    }

    pub fn request(&mut self, stream: u32, payload: &[u8]) -> io::Result<()> {
        self.live.insert(
            stream,
            Entry {
                request: payload.to_vec(),
                response: None,
            },
        );
        self.append(REQUEST, stream, payload)
    }

    pub fn response(&mut self, stream: u32, payload: &[u8]) -> io::Result<()> {
        if let Some(e) = self.live.get_mut(&stream) {
            e.response = Some(payload.to_vec());
        }
        self.append(RESPONSE, stream, payload)
    }

    /// The answer to `stream` was written.
    pub fn done(&mut self, stream: u32) -> io::Result<()> {
        self.live.remove(&stream);
        if self.live.is_empty() && !self.unsafe_read {
            // Nothing live: start over, in one header write.
            self.start = HEADER;
            self.len = 0;
            self.write_header()?;
            if self.high > HEADER + COMPACT_AT / 4 {
                self.file.set_len(HEADER)?;
                self.high = HEADER;
            }
            return Ok(());
        }
        self.append(DONE, stream, &[])?;
        if self.len > COMPACT_AT {
            self.rewrite()?;
        }
        Ok(())
    }

    /// A frame is read in pieces from now on (`true`) or no longer.
    pub fn set_unsafe(&mut self, on: bool) -> io::Result<()> {
        if self.unsafe_read == on {
            return Ok(());
        }
        self.unsafe_read = on;
        self.append(if on { UNSAFE } else { SAFE }, 0, &[])
    }

    /// Forgets `stream` without an answer (its request is read again).
    pub fn forget(&mut self, stream: u32) -> io::Result<()> {
        self.live.remove(&stream);
        self.rewrite()
    }

    fn append(&mut self, kind: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        let mut rec = Vec::with_capacity(9 + payload.len());
        rec.push(kind);
        rec.extend_from_slice(&stream.to_be_bytes());
        rec.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        rec.extend_from_slice(payload);
        self.file.write_all_at(&rec, self.start + self.len)?;
        self.len += rec.len() as u64;
        self.high = self.high.max(self.start + self.len);
        self.write_header()
    }

    /// Writes only what is live, past the current records (or at the start
    /// when it fits before them), then switches the header to it.
    fn rewrite(&mut self) -> io::Result<()> {
        let mut data = Vec::new();
        if self.unsafe_read {
            data.extend_from_slice(&[UNSAFE, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
        for (stream, e) in &self.live {
            for (kind, payload) in [(REQUEST, Some(&e.request)), (RESPONSE, e.response.as_ref())] {
                let Some(payload) = payload else { continue };
                data.push(kind);
                data.extend_from_slice(&stream.to_be_bytes());
                data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                data.extend_from_slice(payload);
            }
        }
        let at = if (data.len() as u64) <= self.start - HEADER {
            HEADER
        } else {
            self.start + self.len
        };
        self.file.write_all_at(&data, at)?;
        self.start = at;
        self.len = data.len() as u64;
        self.write_header()?;
        self.high = self.high.max(at + self.len);
        if at == HEADER {
            // Give back what the old records used.
            self.file.set_len(HEADER + self.len)?;
            self.high = HEADER + self.len;
        }
        Ok(())
    }

    fn write_header(&mut self) -> io::Result<()> {
        let mut head = [0u8; 24];
        head[0..8].copy_from_slice(MAGIC);
        head[8..16].copy_from_slice(&self.start.to_be_bytes());
        head[16..24].copy_from_slice(&self.len.to_be_bytes());
        self.file.write_all_at(&head, 0)
    }
}

fn parse(mut data: &[u8]) -> io::Result<Recovered> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed journal record");
    let mut rec = Recovered::default();
    while !data.is_empty() {
        if data.len() < 9 {
            return Err(bad());
        }
        let kind = data[0];
        let stream = u32::from_be_bytes(data[1..5].try_into().unwrap());
        let len = u32::from_be_bytes(data[5..9].try_into().unwrap());
        if len > MAX_RECORD || data.len() - 9 < len as usize {
            return Err(bad());
        }
        let payload = &data[9..9 + len as usize];
        data = &data[9 + len as usize..];
        match kind {
            REQUEST => {
                rec.entries.insert(
                    stream,
                    Entry {
                        request: payload.to_vec(),
                        response: None,
                    },
                );
                rec.last_request = Some(stream);
            }
            RESPONSE => {
                if let Some(e) = rec.entries.get_mut(&stream) {
                    e.response = Some(payload.to_vec());
                }
            }
            DONE => {
                rec.entries.remove(&stream);
            }
            UNSAFE => rec.unsafe_read = true,
            SAFE => rec.unsafe_read = false,
            _ => return Err(bad()),
        }
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(j: &Journal) -> Recovered {
        let fd = j.fd().try_clone_to_owned().unwrap();
        Journal::open(fd).unwrap().1
    }

    #[test]
    fn pending_requests_and_answers_survive() {
        let mut j = Journal::create().unwrap();
        j.request(1, b"wait").unwrap();
        j.request(3, b"state").unwrap();
        j.response(3, b"running").unwrap();
        j.request(5, b"pids").unwrap();
        j.response(5, b"[1]").unwrap();
        j.done(5).unwrap();
        let r = reopen(&j);
        assert_eq!(r.last_request, Some(5));
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[&1].request, b"wait");
        assert_eq!(r.entries[&1].response, None);
        assert_eq!(r.entries[&3].response.as_deref(), Some(&b"running"[..]));
        assert!(!r.unsafe_read);
    }

    #[test]
    fn an_answered_connection_leaves_an_empty_journal() {
        let mut j = Journal::create().unwrap();
        for s in (1..400).step_by(2) {
            j.request(s, &[7u8; 100]).unwrap();
            j.response(s, b"ok").unwrap();
            j.done(s).unwrap();
        }
        assert_eq!(j.len, 0);
        assert_eq!(reopen(&j), Recovered::default());
    }

    #[test]
    fn a_long_wait_among_many_calls_is_compacted_not_lost() {
        let mut j = Journal::create().unwrap();
        j.request(1, b"wait").unwrap();
        for s in (3..20_000).step_by(2) {
            j.request(s, &[1u8; 64]).unwrap();
            j.response(s, &[2u8; 64]).unwrap();
            j.done(s).unwrap();
        }
        assert!(j.len <= COMPACT_AT + 200, "{}", j.len);
        let size = j.file.metadata().unwrap().len();
        assert!(size < 3 * COMPACT_AT, "journal file grew to {size}");
        let r = reopen(&j);
        assert_eq!(r.entries.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_record_not_covered_by_the_header_does_not_count() {
        let mut j = Journal::create().unwrap();
        j.request(1, b"create").unwrap();
        // A daemon killed after writing a record but before the header.
        let mut rec = vec![REQUEST];
        rec.extend_from_slice(&3u32.to_be_bytes());
        rec.extend_from_slice(&5u32.to_be_bytes());
        rec.extend_from_slice(b"start");
        j.file.write_all_at(&rec, j.start + j.len).unwrap();
        let r = reopen(&j);
        assert_eq!(r.entries.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_piecewise_read_is_remembered() {
        let mut j = Journal::create().unwrap();
        j.set_unsafe(true).unwrap();
        assert!(reopen(&j).unsafe_read);
        j.set_unsafe(false).unwrap();
        assert!(!reopen(&j).unsafe_read);
    }

    #[test]
    fn garbage_is_refused() {
        let j = Journal::create().unwrap();
        j.file.write_all_at(b"not a journal at all...", 0).unwrap();
        assert!(Journal::open(j.fd().try_clone_to_owned().unwrap()).is_err());
        let mut j = Journal::create().unwrap();
        j.request(1, b"x").unwrap();
        j.file.write_all_at(&[9], j.start).unwrap();
        assert!(Journal::open(j.fd().try_clone_to_owned().unwrap()).is_err());
    }
}
