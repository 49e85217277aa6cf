//! The on-disk spool: events wait here, in order, until the broker confirms
//! them, so a broker that is down or slow costs disk space rather than
//! events, and events survive a restart of sluice.
//!
//! A directory of segment files (`00000000000000000001.spool`, ...), each a
//! sequence of lines `topic TAB id TAB key TAB json`, and a `cursor` file
//! naming the first unconfirmed line (segment and byte offset). Appends go
//! to the last segment; the publisher reads from the cursor and advances it
//! once the broker confirms; a fully confirmed segment is deleted. After a
//! crash between a confirmation and the cursor write, the events since the
//! last cursor are sent again: consumers dedupe by id.
//!
//! Plain `std::fs` calls under a mutex: the spool is written once per flush
//! interval (aggregated events, not decisions) and read once per publish
//! batch, so the calls are few and short, and never on the decision path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::{Record, Topic};

/// Start a new segment beyond this size, so confirmed events free disk
/// space without waiting for the whole spool to drain.
const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Segment numbers on disk, oldest first; never empty.
    segments: Vec<u64>,
    /// Bytes of the last segment.
    tail_len: u64,
    /// The first unconfirmed line: its byte offset in `segments[0]`.
    offset: u64,
    /// Bytes and events not yet confirmed.
    bytes: u64,
    events: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, keeping any events a previous
    /// run left unconfirmed.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut segments: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".spool")?.parse().ok()
            })
            .collect();
        segments.sort_unstable();
        let (cursor_segment, mut offset) = read_cursor(dir);
        // Segments before the cursor were confirmed; a crash may have left
        // them behind.
        while segments.len() > 1 && segments[0] < cursor_segment {
            let _ = fs::remove_file(segment_path(dir, segments[0]));
            segments.remove(0);
        }
        if segments.first() != Some(&cursor_segment) {
            offset = 0;
        }
        if segments.is_empty() {
            segments.push(cursor_segment.max(1));
            File::create(segment_path(dir, segments[0]))?;
        }
        let mut spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            segments,
            tail_len: 0,
            offset,
            bytes: 0,
            events: 0,
        };
        spool.recount()?;
        Ok(spool)
    }

    fn recount(&mut self) -> io::Result<()> {
        let (mut bytes, mut events) = (0, 0);
        for (i, &segment) in self.segments.iter().enumerate() {
            let mut file = File::open(self.path(segment))?;
            let len = file.metadata()?.len();
            let start = if i == 0 { self.offset.min(len) } else { 0 };
            file.seek(SeekFrom::Start(start))?;
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                bytes += n as u64;
                events += 1;
            }
            if i + 1 == self.segments.len() {
                self.tail_len = len;
            }
        }
        self.bytes = bytes;
        self.events = events;
        Ok(())
    }

    fn path(&self, segment: u64) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    /// Bytes waiting to be confirmed.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Events waiting to be confirmed.
    pub fn len(&self) -> u64 {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Appends records in order, as many as fit under the size bound;
    /// returns how many were appended (the rest are the caller's to count
    /// as dropped).
    pub fn append(&mut self, records: &[Record]) -> io::Result<usize> {
        let mut buf = Vec::new();
        let mut taken = 0;
        for record in records {
            let line = encode(record);
            if self.bytes + (buf.len() + line.len()) as u64 > self.max_bytes {
                break;
            }
            buf.extend_from_slice(&line);
            taken += 1;
        }
        if taken == 0 {
            return Ok(0);
        }
        if self.tail_len >= SEGMENT_BYTES {
            let next = self.segments[self.segments.len() - 1] + 1;
            File::create(self.path(next))?;
            self.segments.push(next);
            self.tail_len = 0;
        }
        let tail = self.segments[self.segments.len() - 1];
        let mut file = OpenOptions::new().append(true).open(self.path(tail))?;
        file.write_all(&buf)?;
        self.tail_len += buf.len() as u64;
        self.bytes += buf.len() as u64;
        self.events += taken as u64;
        Ok(taken)
    }

    /// Up to `max` records from the cursor, oldest first, without removing
    /// them. A line that cannot be read back (a torn write at a crash) is
    /// skipped.
    pub fn peek(&self, max: usize) -> io::Result<Vec<(Record, u64)>> {
        let mut out = Vec::new();
        for (i, &segment) in self.segments.iter().enumerate() {
            let mut file = File::open(self.path(segment))?;
            if i == 0 {
                file.seek(SeekFrom::Start(self.offset))?;
            }
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            while out.len() < max {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                let Some(record) = decode(&line[..n - 1]) else {
                    tracing::warn!(segment, "skipping an unreadable spool line");
                    out.push((skipped(), n as u64));
                    continue;
                };
                out.push((record, n as u64));
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Forgets the first `count` records of the last `peek`, of `bytes` in
    /// all: the broker confirmed them.
    pub fn commit(&mut self, count: u64, mut bytes: u64) -> io::Result<()> {
        self.events = self.events.saturating_sub(count);
        self.bytes = self.bytes.saturating_sub(bytes);
        while bytes > 0 {
            let head = self.segments[0];
            let len = fs::metadata(self.path(head))?.len();
            let left = len - self.offset.min(len);
            if bytes < left || self.segments.len() == 1 {
                self.offset += bytes.min(left);
                bytes = 0;
            } else {
                bytes -= left;
                fs::remove_file(self.path(head))?;
                self.segments.remove(0);
                self.offset = 0;
            }
        }
        // The whole spool confirmed: start the segment afresh so disk use
        // shrinks to nothing.
        if self.segments.len() == 1 && self.events == 0 && self.offset > 0 {
            let head = self.segments[0];
            let next = head + 1;
            File::create(self.path(next))?;
            self.segments = vec![next];
            self.offset = 0;
            self.tail_len = 0;
            write_cursor(&self.dir, next, 0)?;
            fs::remove_file(self.path(head))?;
            return Ok(());
        }
        write_cursor(&self.dir, self.segments[0], self.offset)
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.spool"))
}

fn read_cursor(dir: &Path) -> (u64, u64) {
    let text = fs::read_to_string(dir.join("cursor")).unwrap_or_default();
    let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(segment), Some(offset)) => (segment, offset),
        _ => (1, 0),
    }
}

/// Written to a temporary file and renamed, so a crash leaves the old
/// cursor or the new one, never half of one.
fn write_cursor(dir: &Path, segment: u64, offset: u64) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    fs::write(&tmp, format!("{segment} {offset}\n"))?;
    fs::rename(tmp, dir.join("cursor"))
}

fn encode(record: &Record) -> Vec<u8> {
    let mut line = Vec::with_capacity(record.body.len() + 64);
    line.extend_from_slice(record.topic.name().as_bytes());
    line.push(b'\t');
    line.extend_from_slice(record.id.to_string().as_bytes());
    line.push(b'\t');
    line.extend_from_slice(record.key.as_bytes());
    line.push(b'\t');
    // Compact JSON escapes control characters: the body has no newline.
    line.extend_from_slice(&record.body);
    line.push(b'\n');
    line
}

fn decode(line: &[u8]) -> Option<Record> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.splitn(4, '\t');
    let topic = Topic::from_name(parts.next()?)?;
    let id = parts.next()?.parse().ok()?;
    let key = parts.next()?.to_owned();
    let body = parts.next()?.as_bytes().to_vec();
    Some(Record {
        topic,
        id,
        key,
        body,
    })
}

/// Stands in for an unreadable line so its bytes are still committed; the
/// publisher does not send records with an empty body.
fn skipped() -> Record {
    Record {
        topic: Topic::RequestLogs,
        id: Uuid::nil(),
        key: String::new(),
        body: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32) -> Record {
        Record {
            topic: Topic::Usage,
            id: Uuid::new_v4(),
            key: "t".into(),
            body: format!("{{\"n\":{n}}}").into_bytes(),
        }
    }

    #[test]
    fn records_come_back_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let sent: Vec<Record> = (0..10).map(record).collect();
        assert_eq!(spool.append(&sent).unwrap(), 10);
        let first = spool.peek(4).unwrap();
        let got: Vec<Record> = first.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(got, sent[..4]);
        let bytes: u64 = first.iter().map(|(_, n)| n).sum();
        spool.commit(4, bytes).unwrap();
        assert_eq!(spool.len(), 6);
        drop(spool);

        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.len(), 6);
        let rest = spool.peek(100).unwrap();
        let got: Vec<Record> = rest.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(got, sent[4..]);
        let bytes: u64 = rest.iter().map(|(_, n)| n).sum();
        spool.commit(6, bytes).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert!(spool.peek(10).unwrap().is_empty());
        assert_eq!(Spool::open(dir.path(), 1 << 20).unwrap().len(), 0);
    }

    #[test]
    fn the_size_bound_refuses_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let one = encode(&record(1)).len() as u64;
        let mut spool = Spool::open(dir.path(), one * 3).unwrap();
        let records: Vec<Record> = (1..=5).map(record).collect();
        assert_eq!(spool.append(&records).unwrap(), 3);
        assert_eq!(spool.append(&records[3..]).unwrap(), 0);
        let all = spool.peek(10).unwrap();
        spool.commit(1, all[0].1).unwrap();
        assert_eq!(spool.append(&records[3..]).unwrap(), 1);
    }

    #[test]
    fn confirmed_segments_are_deleted_across_segment_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), u64::MAX).unwrap();
        let big = Record {
            body: vec![b'x'; SEGMENT_BYTES as usize / 2],
            ..record(0)
        };
        for _ in 0..5 {
            assert_eq!(spool.append(std::slice::from_ref(&big)).unwrap(), 1);
        }
        assert!(spool.segments.len() >= 2);
        let all = spool.peek(10).unwrap();
        assert_eq!(all.len(), 5);
        let (three, rest) = all.split_at(3);
        spool.commit(3, three.iter().map(|(_, n)| n).sum()).unwrap();
        let left = spool.peek(10).unwrap();
        assert_eq!(left.len(), 2);
        spool.commit(2, rest.iter().map(|(_, n)| n).sum()).unwrap();
        assert!(spool.is_empty());
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "one empty segment and the cursor");
    }
}
