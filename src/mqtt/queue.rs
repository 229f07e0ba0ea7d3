//! The on-disk alarm queue: alarms are never lost while the disk has room.
//!
//! Input: alarms ([`AlarmQueue::push`]) and broker acknowledgements ([`AlarmQueue::ack`]).
//! Output: the queued alarms, oldest first, restored after a restart or a crash; the file
//! `<state_dir>/`[`QUEUE_FILE`].
//!
//! The same code, generic over [`Queued`], keeps the answers to trigger requests
//! ([`InspectionQueue`], file `<state_dir>/`[`INSPECTION_QUEUE_FILE`], same format, the
//! record's `alarm` key holding an inspection result; no v1 file). What is said below of
//! alarms holds for them too.
//!
//! # File format (`alarm-queue.v2`)
//! A sequence of records, each framed so that a reader can check it and, after any damage,
//! find the next good one:
//!
//! ```text
//! record  = RS "AQ2" SP len SP crc SP payload LF
//! RS      = 0x1E (ASCII record separator, as in RFC 7464 JSON text sequences)
//! len     = 8 lowercase hex digits: byte length of payload (at most MAX_PAYLOAD)
//! crc     = 8 lowercase hex digits: CRC-32 (IEEE, crate crc32fast) of payload
//! payload = {"op":"add","id":N,"alarm":{"camera":…,"active":…,"seq":…,"ts_ms":…,"score":…}}
//!         | {"op":"del","id":N}
//! ```
//!
//! An `add` is written and fsync'd before the alarm is sent; a `del` is written (not fsync'd:
//! a lost `del` only means a duplicate after a crash) when the broker acknowledges it or the
//! full-queue policy drops it. The queued alarms are the `add`s without a `del`, in id order
//! (ids increase with every push), so duplicated or reordered records change nothing.
//!
//! Reading: the reader looks for RS and accepts a record only when the magic, both hex fields,
//! the length, the trailing LF and the CRC all match and the payload parses; otherwise it
//! resumes the search at the byte after that RS — never after the claimed length, which may be
//! the damaged part. JSON as serde_json writes it never contains a raw control character, so
//! an RS is always the start of a record (or of garbage), never inside a good payload. Damaged
//! bytes (a torn write, a flipped bit, invalid UTF-8, garbage) are therefore skipped with a
//! warning and cost only the records they touch. When the file had damage, its bytes are kept
//! in `<QUEUE_FILE>.damaged` before the queue is rewritten.
//!
//! Writing: no record is ever glued behind a torn one. After a failed write or fsync (a full
//! disk), the queue is marked out of sync and the next change rewrites the whole file (temporary
//! file, fsync, rename, fsync of the directory; [`crate::statedir::replace_file`]) from memory,
//! which still holds every alarm; until that succeeds the alarms live in memory only (counted
//! as `queue_errors` by the publisher). Even if a torn fragment were followed by a good record,
//! the reader would resynchronise on the good record's RS.
//!
//! Ids: at every open the restored alarms are renumbered 0, 1, … and the file is rewritten
//! with just them, so ids from a file (even `u64::MAX`) never overflow; ids are checked at every
//! push, and should 2^64 pushes in one process ever exhaust them the queue renumbers and sends
//! everything again (at least once, never lost). The file is truncated whenever the queue
//! becomes empty and rewritten when dead records dominate it; a rewrite writes every queued
//! alarm.
//!
//! Migration: a v1 file (`alarm-queue.v1.jsonl`, JSON lines) is read once, line by line as
//! bytes — a line that is torn, not UTF-8 or not a record is skipped with its line number and
//! costs only itself — merged behind the v2 alarms (an alarm already there is not repeated),
//! written to the v2 file, and removed.
//!
//! Failure modes: a symlink at the queue's name → [`AlarmQueue::open`] fails with an error that
//! says so (`O_NOFOLLOW`; nothing outside the state directory is read or written); an unreadable
//! file or a failed first rewrite → error from `open`; a write error later → [`PushOutcome`]
//! or `ack` returns it and the alarm is kept in memory.
//!
//! Delivery is at least once: an alarm acknowledged by the broker just before a crash, before
//! its `del` reached the disk, is sent again after the restart; consumers de-duplicate on
//! (camera, seq, active).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::WhenFull;
use crate::payload::{Alarm, Inspection};
use crate::statedir;

/// File name of the alarm queue inside the state directory (format version in the name).
pub const QUEUE_FILE: &str = "alarm-queue.v2";
/// The version-1 queue (JSON lines), migrated to [`QUEUE_FILE`] at open.
pub const QUEUE_FILE_V1: &str = "alarm-queue.v1.jsonl";
/// Suffix of the copy kept of a queue file that had damaged records.
pub const DAMAGED_SUFFIX: &str = ".damaged";
/// Largest record payload written or accepted (an alarm is ~150 bytes).
pub const MAX_PAYLOAD: usize = 1 << 20;

const MAGIC: &[u8] = b"\x1eAQ2 ";
/// RS "AQ2" SP, 8 hex, SP, 8 hex, SP.
const HEADER_LEN: usize = MAGIC.len() + 8 + 1 + 8 + 1;
const RS: u8 = 0x1e;

/// What a queue holds: alarms ([`AlarmQueue`]) or inspection results ([`InspectionQueue`]),
/// each in its own file of the same format (the record's `alarm` key holds the stored item).
pub trait Queued: Clone + std::fmt::Debug {
    /// The form written to the file.
    type Stored: Serialize + DeserializeOwned + std::fmt::Debug;
    /// File name inside the state directory.
    const FILE: &'static str;
    /// The version-1 file migrated at open, if the kind had one.
    const V1_FILE: Option<&'static str>;
    fn stored(&self) -> Self::Stored;
    fn restore(s: Self::Stored) -> Self;
    /// The topic levels it is published under: `camera` or `camera/region`.
    fn unit(&self) -> String;
    /// Whether two items are the same message (merging a v1 file).
    fn same(a: &Self, b: &Self) -> bool;
}

impl Queued for Alarm {
    type Stored = StoredAlarm;
    const FILE: &'static str = QUEUE_FILE;
    const V1_FILE: Option<&'static str> = Some(QUEUE_FILE_V1);
    fn stored(&self) -> StoredAlarm {
        StoredAlarm::from(self)
    }
    fn restore(s: StoredAlarm) -> Self {
        s.into()
    }
    fn unit(&self) -> String {
        Alarm::unit(self)
    }
    fn same(a: &Self, b: &Self) -> bool {
        same_alarm(a, b)
    }
}

impl Queued for Inspection {
    type Stored = Inspection;
    const FILE: &'static str = INSPECTION_QUEUE_FILE;
    const V1_FILE: Option<&'static str> = None;
    fn stored(&self) -> Inspection {
        self.clone()
    }
    fn restore(s: Inspection) -> Self {
        s
    }
    fn unit(&self) -> String {
        self.camera.clone()
    }
    fn same(a: &Self, b: &Self) -> bool {
        a.result_id == b.result_id && a.meas_id == b.meas_id
    }
}

/// The on-disk queue of alarms.
pub type AlarmQueue = Queue<Alarm>;
/// The on-disk queue of inspection results (triggered inspection, [`crate::payload::Inspection`]).
pub type InspectionQueue = Queue<Inspection>;

/// File name of the inspection-result queue inside the state directory.
pub const INSPECTION_QUEUE_FILE: &str = "inspection-queue.v2";

/// One record of the queue file (the JSON payload).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
#[serde(bound = "S: Serialize + DeserializeOwned")]
enum Record<S> {
    /// An item was queued (written and fsync'd before it is sent).
    Add { id: u64, alarm: S },
    /// The alarm with this id was acknowledged by the broker, or dropped because the queue was
    /// full (not fsync'd: a lost `del` only means a duplicate after a crash).
    Del { id: u64 },
}

/// An [`Alarm`] as stored: a non-finite score is written as `null` (JSON has no NaN) and read
/// back as NaN, so such an alarm is not lost as an unreadable record.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredAlarm {
    camera: String,
    active: bool,
    seq: u64,
    ts_ms: u64,
    score: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region: Option<String>,
}

impl From<&Alarm> for StoredAlarm {
    fn from(a: &Alarm) -> Self {
        Self {
            camera: a.camera.clone(),
            active: a.active,
            seq: a.seq,
            ts_ms: a.ts_ms,
            score: a.score.is_finite().then_some(a.score),
            region: a.region.clone(),
        }
    }
}

impl From<StoredAlarm> for Alarm {
    fn from(s: StoredAlarm) -> Self {
        Self {
            camera: s.camera,
            active: s.active,
            seq: s.seq,
            ts_ms: s.ts_ms,
            score: s.score.unwrap_or(f32::NAN),
            region: s.region,
        }
    }
}

/// Appends one framed record to `out`.
fn encode<S: Serialize + DeserializeOwned>(rec: &Record<S>, out: &mut Vec<u8>) -> io::Result<()> {
    let payload = serde_json::to_vec(rec).map_err(io::Error::other)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "alarm queue record of {} bytes exceeds {MAX_PAYLOAD}",
                payload.len()
            ),
        ));
    }
    let crc = crc32fast::hash(&payload);
    write!(out, "\x1eAQ2 {:08x} {crc:08x} ", payload.len())?;
    out.extend_from_slice(&payload);
    out.push(b'\n');
    Ok(())
}

/// Eight lowercase hex digits, nothing else (no sign, no space, no upper case: one record has
/// exactly one encoding, so a flipped case bit is damage like any other).
fn hex32(b: &[u8]) -> Option<u32> {
    if b.len() != 8 || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}

/// The record starting at `start` (an RS) and the offset just past its LF, if it is whole and
/// its checksum matches.
fn decode_at<S: Serialize + DeserializeOwned>(
    buf: &[u8],
    start: usize,
) -> Option<(Record<S>, usize)> {
    let header = buf.get(start..start.checked_add(HEADER_LEN)?)?;
    if !header.starts_with(MAGIC) || header[13] != b' ' || header[22] != b' ' {
        return None;
    }
    let len = usize::try_from(hex32(&header[5..13])?).ok()?;
    let crc = hex32(&header[14..22])?;
    if len > MAX_PAYLOAD {
        return None;
    }
    let p0 = start + HEADER_LEN;
    let p1 = p0.checked_add(len)?;
    let payload = buf.get(p0..p1)?;
    if buf.get(p1) != Some(&b'\n') || crc32fast::hash(payload) != crc {
        return None;
    }
    let rec = serde_json::from_slice(payload).ok()?;
    Some((rec, p1 + 1))
}

/// What a read of a queue file found.
#[derive(Debug)]
struct Scan<S> {
    records: Vec<Record<S>>,
    /// Skipped byte ranges (damage), in file order.
    damaged: Vec<(usize, usize)>,
}

impl<S> Default for Scan<S> {
    fn default() -> Self {
        Self {
            records: Vec::new(),
            damaged: Vec::new(),
        }
    }
}

impl<S> Scan<S> {
    fn skip(&mut self, from: usize, to: usize) {
        match self.damaged.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => self.damaged.push((from, to)),
        }
    }

    fn damaged_bytes(&self) -> usize {
        self.damaged.iter().map(|(a, b)| b - a).sum()
    }
}

/// Reads every good record of a v2 file, resynchronising after damage (see the module docs).
fn scan_v2<S: Serialize + DeserializeOwned>(buf: &[u8]) -> Scan<S> {
    let mut scan = Scan::default();
    let mut pos = 0;
    while pos < buf.len() {
        let Some(rel) = buf[pos..].iter().position(|&b| b == RS) else {
            scan.skip(pos, buf.len());
            break;
        };
        let start = pos + rel;
        if start > pos {
            scan.skip(pos, start);
        }
        match decode_at(buf, start) {
            Some((rec, end)) => {
                scan.records.push(rec);
                pos = end;
            }
            None => {
                scan.skip(start, start + 1);
                pos = start + 1;
            }
        }
    }
    scan
}

/// Reads a v1 file (JSON lines) line by line as bytes: a bad line costs only itself.
fn scan_v1<S: Serialize + DeserializeOwned>(buf: &[u8], path: &Path) -> Scan<S> {
    let mut scan = Scan::default();
    let mut pos = 0;
    for (n, line) in buf.split_inclusive(|&b| b == b'\n').enumerate() {
        let end = pos + line.len();
        let Some(body) = line.strip_suffix(b"\n") else {
            warn!(path = %path.display(), line = n + 1, "alarm queue (v1): torn last record (crash during write) skipped");
            scan.skip(pos, end);
            break;
        };
        match serde_json::from_slice::<Record<S>>(body) {
            Ok(rec) => scan.records.push(rec),
            Err(e) => {
                warn!(path = %path.display(), line = n + 1, error = %e, "alarm queue (v1): corrupt record skipped");
                scan.skip(pos, end);
            }
        }
        pos = end;
    }
    scan
}

/// The queued alarms of a set of records: the `add`s without a `del`, in id order; a repeated
/// `add` of one id counts once.
fn live<T: Queued>(records: Vec<Record<T::Stored>>) -> Vec<T> {
    let mut adds: BTreeMap<u64, T::Stored> = BTreeMap::new();
    let mut dels: HashSet<u64> = HashSet::new();
    for rec in records {
        match rec {
            Record::Add { id, alarm } => {
                adds.entry(id).or_insert(alarm);
            }
            Record::Del { id } => {
                dels.insert(id);
            }
        }
    }
    adds.into_iter()
        .filter(|(id, _)| !dels.contains(id))
        .map(|(_, a)| T::restore(a))
        .collect()
}

/// Reads one queue file (`v1` picks the format); `None` if it does not exist. Damage is logged,
/// and the original bytes are kept in `<path>.damaged`.
fn load<T: Queued>(path: &Path, v1: bool) -> io::Result<Option<Vec<T>>> {
    // The error names the file (e.g. a directory or a device at the queue's name).
    let Some(buf) = statedir::read_file(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
    else {
        return Ok(None);
    };
    let scan = if v1 {
        scan_v1(&buf, path)
    } else {
        scan_v2(&buf)
    };
    if !scan.damaged.is_empty() {
        let (first, _) = scan.damaged[0];
        let mut keep = path.as_os_str().to_owned();
        keep.push(DAMAGED_SUFFIX);
        let keep = PathBuf::from(keep);
        warn!(
            path = %path.display(),
            damaged_bytes = scan.damaged_bytes(),
            regions = scan.damaged.len(),
            first_offset = first,
            good_records = scan.records.len(),
            copy = %keep.display(),
            "alarm queue: damaged bytes skipped (torn write or corruption); every good record is kept"
        );
        if let Err(e) = statedir::replace_file(&keep, &buf) {
            warn!(path = %keep.display(), error = %e, "alarm queue: cannot keep a copy of the damaged file");
        }
    }
    Ok(Some(live::<T>(scan.records)))
}

#[derive(Debug, Clone)]
pub(super) struct Entry<T> {
    pub(super) id: u64,
    pub(super) alarm: T,
    /// Send with `replayed: true`.
    pub(super) replay: bool,
    /// Handed to the current connection.
    pub(super) sent: bool,
}

/// What [`AlarmQueue::push`] did.
#[derive(Debug)]
pub struct PushOutcome<T = Alarm> {
    /// An item discarded by the full-queue policy (the oldest, or the new one).
    pub dropped: Option<T>,
    /// The write failed; the alarm is kept in memory only (until a later write succeeds).
    pub io_error: Option<io::Error>,
}

impl<T> Default for PushOutcome<T> {
    fn default() -> Self {
        Self {
            dropped: None,
            io_error: None,
        }
    }
}

/// Bounded, append-only, fsync'd queue; the format and its guarantees are in the module
/// docs.
#[derive(Debug)]
pub struct Queue<T: Queued> {
    path: PathBuf,
    file: Option<File>,
    pub(super) entries: VecDeque<Entry<T>>,
    next_id: u64,
    max: usize,
    when_full: WhenFull,
    /// Records in the file.
    records: usize,
    /// The file holds exactly `entries` (false after a failed write: rewrite at the next change).
    in_sync: bool,
}

impl<T: Queued> Queue<T> {
    /// Opens (creating `dir` and the file if needed) and restores the queue, migrating a v1
    /// file. Restored alarms will be sent with `replayed: true`.
    pub fn open(dir: &Path, max: usize, when_full: WhenFull) -> io::Result<Self> {
        statedir::create_dir(dir)?;
        let path = dir.join(T::FILE);
        let v1_path = T::V1_FILE.map(|f| dir.join(f));
        let mut alarms: Vec<T> = load(&path, false)?.unwrap_or_default();
        let v1 = match &v1_path {
            Some(p) => load::<T>(p, true)?,
            None => None,
        };
        if let (Some(old), Some(v1_path)) = (&v1, &v1_path) {
            // Both files exist after a crash between the migration's rename and unlink (the v1
            // alarms are then in v2 already), or after a downgrade and upgrade (then they are
            // newer): keep each alarm once.
            let before = alarms.len();
            for a in old {
                if !alarms.iter().take(before).any(|b| T::same(a, b)) {
                    alarms.push(a.clone());
                }
            }
            info!(path = %v1_path.display(), alarms = alarms.len() - before, "alarm queue: migrating the v1 file to {QUEUE_FILE}");
        }
        let max = max.max(1);
        if alarms.len() > max {
            let n = alarms.len() - max;
            warn!(path = %path.display(), dropped = n, max, "alarm queue: more alarms restored than queue_max_alarms; the oldest are dropped");
            alarms.drain(..n);
        }
        let entries: VecDeque<Entry<T>> = alarms
            .into_iter()
            .enumerate()
            .map(|(i, alarm)| Entry {
                id: i as u64,
                alarm,
                replay: true,
                sent: false,
            })
            .collect();
        let mut q = Self {
            path,
            file: None,
            next_id: entries.len() as u64,
            entries,
            max,
            when_full,
            records: 0,
            in_sync: false,
        };
        if !q.entries.is_empty() {
            info!(path = %q.path.display(), alarms = q.entries.len(), "alarm queue restored; will replay after connecting");
        }
        q.rewrite()?;
        if let (Some(_), Some(v1_path)) = (&v1, &v1_path) {
            std::fs::remove_file(v1_path)?;
            statedir::sync_dir(v1_path)?;
        }
        Ok(q)
    }

    /// The queue file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of queued alarms (sent but unacknowledged included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The queued alarms, oldest first.
    pub fn alarms(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|e| &e.alarm)
    }

    /// Appends an alarm (fsync'd) and returns its id, applying the full-queue policy first.
    pub fn push(&mut self, alarm: T, replay: bool) -> (Option<u64>, PushOutcome<T>) {
        let mut out = PushOutcome::default();
        if self.entries.len() >= self.max {
            match self.when_full {
                WhenFull::DropNewest => {
                    out.dropped = Some(alarm);
                    return (None, out);
                }
                WhenFull::DropOldest => {
                    if let Some(old) = self.entries.pop_front() {
                        if let Err(e) =
                            self.persist(&Record::<T::Stored>::Del { id: old.id }, false)
                        {
                            out.io_error = Some(e);
                        }
                        out.dropped = Some(old.alarm);
                    }
                }
            }
        }
        let id = self.take_id();
        self.entries.push_back(Entry {
            id,
            alarm,
            replay,
            sent: false,
        });
        let rec = Record::Add {
            id,
            alarm: self.entries[self.entries.len() - 1].alarm.stored(),
        };
        if let Err(e) = self.persist(&rec, true) {
            out.io_error = Some(e);
        }
        (Some(id), out)
    }

    /// Removes an acknowledged alarm; returns it (None if it was dropped meanwhile).
    pub fn ack(&mut self, id: u64) -> io::Result<Option<T>> {
        let Some(pos) = self.entries.iter().position(|e| e.id == id) else {
            return Ok(None);
        };
        let entry = self.entries.remove(pos);
        if self.entries.is_empty() && self.in_sync {
            self.truncate()?;
        } else {
            self.persist(&Record::<T::Stored>::Del { id }, false)?;
        }
        Ok(entry.map(|e| e.alarm))
    }

    /// After a lost connection: everything is to be sent again, marked replayed.
    pub(super) fn mark_all_unsent(&mut self) {
        for e in &mut self.entries {
            e.sent = false;
            e.replay = true;
        }
    }

    /// Whether an alarm of `key` (a camera, with its regions, or one `camera/region`) is queued.
    pub(super) fn has_camera(&self, key: &str) -> bool {
        self.entries.iter().any(|e| {
            let unit = e.alarm.unit();
            unit == key || unit.strip_prefix(key).is_some_and(|r| r.starts_with('/'))
        })
    }

    /// The next id. Unreachable in practice (ids restart at 0 at every open): should 2^64
    /// pushes exhaust them, the queue is renumbered and every alarm is sent again.
    fn take_id(&mut self) -> u64 {
        if let Some(next) = self.next_id.checked_add(1) {
            let id = self.next_id;
            self.next_id = next;
            return id;
        }
        warn!(path = %self.path.display(), "alarm queue: ids exhausted; renumbering (queued alarms are sent again)");
        for (i, e) in self.entries.iter_mut().enumerate() {
            e.id = i as u64;
        }
        self.mark_all_unsent();
        self.in_sync = false;
        self.next_id = self.entries.len() as u64 + 1;
        self.entries.len() as u64
    }

    /// Brings the file up to date with `entries` after a change whose record is `rec`: appends
    /// it, or rewrites the whole file when it is out of sync or dead records dominate it.
    fn persist(&mut self, rec: &Record<T::Stored>, sync: bool) -> io::Result<()> {
        let compact = self.records > 2 * self.entries.len() + 1024;
        if self.in_sync && !compact {
            self.append(rec, sync)
        } else {
            self.rewrite()
        }
    }

    fn append(&mut self, rec: &Record<T::Stored>, sync: bool) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(256);
        encode(rec, &mut bytes)?;
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(statedir::open_append(&self.path)?),
        };
        let res = file
            .write_all(&bytes)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        match res {
            Ok(()) => {
                self.records += 1;
                Ok(())
            }
            Err(e) => {
                // Part of the record may be in the file: the next change rewrites it whole.
                self.file = None;
                self.in_sync = false;
                Err(e)
            }
        }
    }

    fn truncate(&mut self) -> io::Result<()> {
        let f = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(statedir::open_append(&self.path)?),
        };
        if let Err(e) = f.set_len(0) {
            self.file = None;
            self.in_sync = false;
            return Err(e);
        }
        self.records = 0;
        Ok(())
    }

    /// Writes the queued alarms to a new file that replaces the queue file atomically
    /// ([`statedir::replace_file`]); then reopens it for appending.
    fn rewrite(&mut self) -> io::Result<()> {
        self.file = None;
        self.in_sync = false;
        let mut buf = Vec::with_capacity(self.entries.len() * 192);
        for e in &self.entries {
            let rec = Record::Add {
                id: e.id,
                alarm: e.alarm.stored(),
            };
            encode(&rec, &mut buf)?;
        }
        statedir::replace_file(&self.path, &buf)?;
        self.records = self.entries.len();
        self.file = Some(statedir::open_append(&self.path)?);
        self.in_sync = true;
        Ok(())
    }
}

/// Whether two alarms are the same transition (the consumers' de-duplication key, plus the
/// capture time).
fn same_alarm(a: &Alarm, b: &Alarm) -> bool {
    a.camera == b.camera
        && a.region == b.region
        && a.seq == b.seq
        && a.active == b.active
        && a.ts_ms == b.ts_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarm(seq: u64) -> Alarm {
        Alarm {
            camera: "cam".into(),
            active: seq.is_multiple_of(2),
            seq,
            ts_ms: 1000 + seq,
            score: 0.5,
            region: None,
        }
    }

    fn seqs(q: &AlarmQueue) -> Vec<u64> {
        q.alarms().map(|a| a.seq).collect()
    }

    fn records(path: &Path) -> Vec<Record<StoredAlarm>> {
        scan_v2(&std::fs::read(path).expect("read")).records
    }

    #[test]
    fn queue_survives_reopen_in_order_without_acked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("open");
        let ids: Vec<u64> = (0..5).filter_map(|s| q.push(alarm(s), false).0).collect();
        assert_eq!(q.ack(ids[1]).expect("ack").map(|a| a.seq), Some(1));
        drop(q);
        let q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("reopen");
        assert_eq!(seqs(&q), vec![0, 2, 3, 4]);
        assert!(q.entries.iter().all(|e| e.replay && !e.sent));
        // Rewritten on open: only live records remain, renumbered.
        let recs = records(&dir.path().join(QUEUE_FILE));
        let ids: Vec<u64> = recs
            .iter()
            .map(|r| match r {
                Record::Add { id, .. } => *id,
                Record::Del { .. } => panic!("del after a rewrite"),
            })
            .collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
    }

    #[test]
    fn queue_skips_torn_and_corrupt_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("open");
        q.push(alarm(0), false);
        q.push(alarm(1), false);
        drop(q);
        let path = dir.path().join(QUEUE_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        let torn = bytes[..40].to_vec();
        bytes.splice(0..0, b"garbage line\n".iter().copied());
        bytes.extend_from_slice(&torn);
        std::fs::write(&path, &bytes).expect("write");
        let mut q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("reopen");
        assert_eq!(seqs(&q), vec![0, 1]);
        // The damaged original is kept for a post-mortem.
        let mut keep = path.as_os_str().to_owned();
        keep.push(DAMAGED_SUFFIX);
        assert_eq!(std::fs::read(keep).expect("damaged copy"), bytes);
        // New ids continue after the restored ones and appends land on a clean record.
        let (id, _) = q.push(alarm(2), false);
        assert_eq!(id, Some(2));
        drop(q);
        let q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("reopen 2");
        assert_eq!(seqs(&q), vec![0, 1, 2]);
    }

    #[test]
    fn queue_bound_drop_oldest_and_drop_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = AlarmQueue::open(dir.path(), 3, WhenFull::DropOldest).expect("open");
        for s in 0..3 {
            assert!(q.push(alarm(s), false).1.dropped.is_none());
        }
        let (_, out) = q.push(alarm(3), false);
        assert_eq!(out.dropped.map(|a| a.seq), Some(0));
        assert_eq!(seqs(&q), vec![1, 2, 3]);
        drop(q);
        let mut q = AlarmQueue::open(dir.path(), 3, WhenFull::DropNewest).expect("reopen");
        assert_eq!(seqs(&q), vec![1, 2, 3]);
        let (id, out) = q.push(alarm(4), false);
        assert_eq!((id, out.dropped.map(|a| a.seq)), (None, Some(4)));
        assert_eq!(seqs(&q), vec![1, 2, 3]);
        // Reopening with a smaller bound keeps the newest.
        drop(q);
        let q = AlarmQueue::open(dir.path(), 2, WhenFull::DropOldest).expect("reopen small");
        assert_eq!(seqs(&q), vec![2, 3]);
    }

    #[test]
    fn queue_file_truncated_when_empty_and_compacted_under_churn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(QUEUE_FILE);
        let mut q = AlarmQueue::open(dir.path(), 10, WhenFull::DropOldest).expect("open");
        let (id, _) = q.push(alarm(0), false);
        assert!(std::fs::metadata(&path).expect("meta").len() > 0);
        q.ack(id.expect("id")).expect("ack");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        // Churn through a full queue: the file stays bounded.
        // Each push over the bound writes a del and an add: 700 pushes pass the compaction point.
        for s in 0..700 {
            q.push(alarm(s), false);
        }
        let n = records(&path).len();
        assert!(n <= 2 * 10 + 1024 + 2, "{n}");
        let ids: Vec<u64> = q.entries.iter().map(|e| e.id).collect();
        for id in ids.iter().take(9) {
            q.ack(*id).expect("ack");
        }
        let n = records(&path).len();
        assert!(n < 1100, "{n}");
        assert_eq!(seqs(&q), vec![699]);
        drop(q);
        let q = AlarmQueue::open(dir.path(), 10, WhenFull::DropOldest).expect("reopen");
        assert_eq!(seqs(&q), vec![699]);
    }

    #[test]
    fn ids_exhausted_at_run_time_renumber_without_losing_or_reordering_an_alarm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("open");
        q.push(alarm(0), false);
        q.next_id = u64::MAX - 1;
        let (a, _) = q.push(alarm(1), false);
        assert_eq!(a, Some(u64::MAX - 1));
        q.entries.iter_mut().for_each(|e| e.sent = true);
        let (b, out) = q.push(alarm(2), false);
        assert!(out.io_error.is_none(), "{:?}", out.io_error);
        assert_eq!(b, Some(2));
        assert_eq!(seqs(&q), vec![0, 1, 2]);
        assert!(
            q.entries.iter().all(|e| !e.sent),
            "everything is sent again"
        );
        let ids: Vec<u64> = q.entries.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        drop(q);
        let q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("reopen");
        assert_eq!(seqs(&q), vec![0, 1, 2]);
    }

    #[test]
    fn an_alarm_with_a_nan_score_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("open");
        let mut a = alarm(0);
        a.score = f32::NAN;
        q.push(a, false);
        q.push(alarm(1), false);
        drop(q);
        let q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("reopen");
        assert_eq!(seqs(&q), vec![0, 1]);
        assert!(q.alarms().next().expect("first").score.is_nan());
    }

    #[test]
    fn the_reader_rejects_a_signed_or_short_hex_field_and_an_oversized_length() {
        assert_eq!(hex32(b"0000001f"), Some(31));
        assert_eq!(hex32(b"0000001F"), None);
        assert_eq!(hex32(b"+000001f"), None);
        assert_eq!(hex32(b"000001f"), None);
        let mut buf = Vec::new();
        encode(&Record::<StoredAlarm>::Del { id: 7 }, &mut buf).expect("encode");
        assert!(
            matches!(decode_at::<StoredAlarm>(&buf, 0), Some((Record::Del { id: 7 }, n)) if n == buf.len())
        );
        let mut big = buf.clone();
        big[5..13].copy_from_slice(b"ffffffff");
        assert!(decode_at::<StoredAlarm>(&big, 0).is_none());
        let mut no_lf = buf.clone();
        *no_lf.last_mut().expect("lf") = b' ';
        assert!(decode_at::<StoredAlarm>(&no_lf, 0).is_none());
    }
}
