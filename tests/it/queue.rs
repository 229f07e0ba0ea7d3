//! The on-disk alarm queue (`mqtt::AlarmQueue`) through its public API, against a damaged file:
//! a property test (thousands of random damages: flipped bytes, truncation, inserted garbage,
//! invalid UTF-8, torn, duplicated and reordered records) and regression tests for the faults
//! found by hand (invalid UTF-8 mid-file, a torn append followed by a good one, a disk-full
//! append, ids near `u64::MAX`, symlinks planted in the state directory).
//!
//! The tests read and write the v2 format as its specification says (`mqtt::queue` module
//! docs): `RS "AQ2" SP len(8 hex) SP crc32(8 hex) SP json LF`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anomalyclip_edge::mqtt::{AlarmQueue, QUEUE_FILE, QUEUE_FILE_V1, WhenFull};
use anomalyclip_edge::payload::Alarm;
use proptest::prelude::*;
use serde_json::Value;

const CAMERAS: [&str; 4] = ["cam", "kamera-ü", "line_2-B", "press-0123456789"];

fn alarm(seq: u64) -> Alarm {
    Alarm {
        camera: CAMERAS[(seq % 4) as usize].to_owned(),
        active: seq % 2 == 1,
        seq,
        ts_ms: 1_700_000_000_000 + seq * 37,
        score: seq as f32 / 7.0,
        region: None,
    }
}

fn seqs(q: &AlarmQueue) -> Vec<u64> {
    q.alarms().map(|a| a.seq).collect()
}

fn open(dir: &Path) -> AlarmQueue {
    AlarmQueue::open(dir, 10_000, WhenFull::DropOldest).expect("open the alarm queue")
}

/// A temporary state directory, on tmpfs when there is one (thousands of fsyncs per run).
fn state_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("tempdir")
}

/// One v2 record with `payload` as its JSON, framed as the format says.
fn record(payload: &str) -> Vec<u8> {
    let mut r = format!(
        "\x1eAQ2 {:08x} {:08x} ",
        payload.len(),
        crc32fast::hash(payload.as_bytes())
    )
    .into_bytes();
    r.extend_from_slice(payload.as_bytes());
    r.push(b'\n');
    r
}

fn add_json(id: u64, a: &Alarm) -> String {
    format!(
        r#"{{"op":"add","id":{id},"alarm":{}}}"#,
        serde_json::to_string(a).expect("alarm json")
    )
}

/// The records of a clean v2 file: each starts at an RS (which occurs nowhere else).
fn split_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        if b == 0x1e {
            out.push(Vec::new());
        }
        out.last_mut()
            .unwrap_or_else(|| panic!("byte {i} of a clean queue file is not in a record"))
            .push(b);
    }
    out
}

/// `op`, `id` and the alarm (for an add) of a clean record.
fn parse_record(rec: &[u8]) -> (String, u64, Option<Alarm>) {
    assert!(rec.ends_with(b"\n"), "record without LF");
    let v: Value = serde_json::from_slice(&rec[23..rec.len() - 1]).expect("record payload");
    let alarm = v
        .get("alarm")
        .map(|a| serde_json::from_value(a.clone()).expect("alarm"));
    (
        v["op"].as_str().expect("op").to_owned(),
        v["id"].as_u64().expect("id"),
        alarm,
    )
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Property: every undamaged record is replayed, in order, exactly as written
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Push,
    /// Acknowledge the n-th (mod len) queued alarm.
    Ack(usize),
}

#[derive(Debug, Clone)]
enum Damage {
    Flip {
        seg: usize,
        at: usize,
        mask: u8,
    },
    InvalidUtf8 {
        seg: usize,
        at: usize,
    },
    Truncate {
        at: usize,
    },
    Insert {
        seg: usize,
        at: usize,
        bytes: Vec<u8>,
    },
    TornCopy {
        seg: usize,
        len: usize,
        to: usize,
    },
    Duplicate {
        seg: usize,
        to: usize,
    },
    Swap {
        a: usize,
        b: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![3 => Just(Op::Push), 1 => any::<usize>().prop_map(Op::Ack)]
}

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..24),
        prop::collection::vec(
            prop_oneof![Just(0x1eu8), Just(b'\n'), Just(0xff), Just(b'{')],
            1..6
        ),
        Just(b"\x1eAQ2 00000010 00000000 ".to_vec()),
        Just(vec![0xc3, 0x28, 0xa0, 0xa1]),
    ]
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<usize>(), 1u8..=255).prop_map(|(seg, at, mask)| Damage::Flip {
            seg,
            at,
            mask
        }),
        (any::<usize>(), any::<usize>()).prop_map(|(seg, at)| Damage::InvalidUtf8 { seg, at }),
        any::<usize>().prop_map(|at| Damage::Truncate { at }),
        (any::<usize>(), any::<usize>(), garbage()).prop_map(|(seg, at, bytes)| Damage::Insert {
            seg,
            at,
            bytes
        }),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(seg, len, to)| Damage::TornCopy { seg, len, to }),
        (any::<usize>(), any::<usize>()).prop_map(|(seg, to)| Damage::Duplicate { seg, to }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Damage::Swap { a, b }),
    ]
}

/// Applies `d` to the file, kept as segments (initially one per record) so that damage can
/// move whole pieces around.
fn apply(segs: &mut Vec<Vec<u8>>, d: &Damage) {
    let n = segs.len();
    match d {
        Damage::Flip { seg, at, mask } if n > 0 => {
            let s = &mut segs[seg % n];
            if !s.is_empty() {
                let i = at % s.len();
                s[i] ^= mask;
            }
        }
        Damage::InvalidUtf8 { seg, at } if n > 0 => {
            let s = &mut segs[seg % n];
            if !s.is_empty() {
                let i = at % s.len();
                s[i] = if s[i] == 0xff { 0xfe } else { 0xff };
            }
        }
        Damage::Truncate { at } => {
            let total: usize = segs.iter().map(Vec::len).sum();
            let mut keep = at % (total + 1);
            let mut out = Vec::new();
            for s in segs.drain(..) {
                if keep == 0 {
                    break;
                }
                let take = keep.min(s.len());
                out.push(s[..take].to_vec());
                keep -= take;
            }
            *segs = out;
        }
        Damage::Insert { seg, at, bytes } => {
            if n == 0 {
                segs.push(bytes.clone());
                return;
            }
            let k = seg % n;
            let s = segs.remove(k);
            let i = at % (s.len() + 1);
            let parts = [s[..i].to_vec(), bytes.clone(), s[i..].to_vec()];
            for (j, p) in parts.into_iter().filter(|p| !p.is_empty()).enumerate() {
                segs.insert(k + j, p);
            }
        }
        Damage::TornCopy { seg, len, to } if n > 0 => {
            let s = &segs[seg % n];
            if s.len() > 1 {
                let copy = s[..1 + len % (s.len() - 1)].to_vec();
                segs.insert(to % (n + 1), copy);
            }
        }
        Damage::Duplicate { seg, to } if n > 0 => {
            let copy = segs[seg % n].clone();
            segs.insert(to % (n + 1), copy);
        }
        Damage::Swap { a, b } if n > 0 => segs.swap(a % n, b % n),
        _ => {}
    }
}

/// Writes a queue through the API (`ops`), damages its file (`damages`), reopens it, and checks
/// that the restored alarms are exactly the adds whose record bytes are still in the file
/// without a `del` whose record bytes are, in write order.
fn check_damaged_queue(ops: &[Op], damages: &[Damage]) -> Result<(), TestCaseError> {
    let dir = state_dir();
    let mut q = open(dir.path());
    let mut seq = 0;
    let mut live: Vec<u64> = Vec::new();
    for op in ops {
        match op {
            Op::Push => {
                let (id, out) = q.push(alarm(seq), false);
                prop_assert!(out.io_error.is_none() && out.dropped.is_none());
                live.push(id.expect("id"));
                seq += 1;
            }
            Op::Ack(i) if !live.is_empty() => {
                let id = live.remove(i % live.len());
                prop_assert!(q.ack(id).expect("ack").is_some());
            }
            Op::Ack(_) => {}
        }
    }
    drop(q);
    let path = dir.path().join(QUEUE_FILE);
    let clean = std::fs::read(&path).expect("read the queue file");
    let records = split_records(&clean);
    let mut segs = records.clone();
    for d in damages {
        apply(&mut segs, d);
    }
    let damaged = segs.concat();
    std::fs::write(&path, &damaged).expect("write the damaged file");

    // Expected: records whose exact bytes survive somewhere in the file.
    let mut adds: Vec<(u64, Alarm)> = Vec::new();
    let mut dels: Vec<u64> = Vec::new();
    for r in &records {
        if !contains(&damaged, r) {
            continue;
        }
        match parse_record(r) {
            (op, id, Some(a)) if op == "add" => adds.push((id, a)),
            (op, id, None) if op == "del" => dels.push(id),
            other => panic!("unexpected record {other:?}"),
        }
    }
    adds.sort_by_key(|(id, _)| *id);
    let expected: Vec<Alarm> = adds
        .into_iter()
        .filter(|(id, _)| !dels.contains(id))
        .map(|(_, a)| a)
        .collect();

    let q = open(dir.path());
    let restored: Vec<Alarm> = q.alarms().cloned().collect();
    prop_assert_eq!(&restored, &expected);
    drop(q);
    // The rewrite at open kept every one of them.
    let q = open(dir.path());
    let again: Vec<Alarm> = q.alarms().cloned().collect();
    prop_assert_eq!(&again, &expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_undamaged_record_is_replayed_in_order_exactly_as_written(
        ops in prop::collection::vec(op(), 0..40),
        damages in prop::collection::vec(damage(), 1..5),
    ) {
        check_damaged_queue(&ops, &damages)?;
    }
}

/// A v1 line damage that makes the line unreadable (v1 has no checksum, so only damage that
/// breaks the JSON or the line can be detected there).
#[derive(Debug, Clone)]
enum V1Damage {
    InvalidUtf8 { line: usize, at: usize },
    Garbage { line: usize, bytes: Vec<u8> },
    Truncate { at: usize },
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_v1_queue_is_migrated_with_every_readable_line(
        n in 0usize..30,
        acked in prop::collection::vec(any::<bool>(), 30),
        damages in prop::collection::vec(prop_oneof![
            (any::<usize>(), any::<usize>()).prop_map(|(line, at)| V1Damage::InvalidUtf8 { line, at }),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..10))
                .prop_map(|(line, bytes)| V1Damage::Garbage { line, bytes }),
            any::<usize>().prop_map(|at| V1Damage::Truncate { at }),
        ], 0..4),
    ) {
        // The lines as v1 wrote them: adds, and a del after some of them.
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for i in 0..n as u64 {
            lines.push(format!("{}\n", add_json(i, &alarm(i))).into_bytes());
            if acked[i as usize] {
                lines.push(format!("{{\"op\":\"del\",\"id\":{i}}}\n").into_bytes());
            }
        }
        let originals = lines.clone();
        let mut file: Vec<u8> = Vec::new();
        for d in &damages {
            match d {
                V1Damage::InvalidUtf8 { line, at } if !lines.is_empty() => {
                    let k = line % lines.len();
                    let l = &mut lines[k];
                    let i = at % l.len().max(1);
                    l.insert(i.min(l.len().saturating_sub(1)), 0xff);
                }
                V1Damage::Garbage { line, bytes } => {
                    let mut g: Vec<u8> = bytes.iter().map(|b| if *b == b'\n' { b'x' } else { *b }).collect();
                    g.push(b'\n');
                    let k = line % (lines.len() + 1);
                    lines.insert(k, g);
                }
                _ => {}
            }
        }
        for l in &lines {
            file.extend_from_slice(l);
        }
        for d in &damages {
            if let V1Damage::Truncate { at } = d {
                file.truncate(at % (file.len() + 1));
            }
        }
        // Expected: whole lines that survived unchanged.
        let survived: Vec<&[u8]> = file.split_inclusive(|b| *b == b'\n').filter(|l| l.ends_with(b"\n")).collect();
        let mut expected = Vec::new();
        for i in 0..n as u64 {
            let add = format!("{}\n", add_json(i, &alarm(i))).into_bytes();
            let del = format!("{{\"op\":\"del\",\"id\":{i}}}\n").into_bytes();
            let has = |l: &[u8]| originals.iter().any(|o| o == l) && survived.contains(&l);
            if has(&add) && !(acked[i as usize] && has(&del)) {
                expected.push(i);
            }
        }
        let dir = state_dir();
        std::fs::write(dir.path().join(QUEUE_FILE_V1), &file).expect("write v1");
        let q = open(dir.path());
        prop_assert_eq!(seqs(&q), expected);
        prop_assert!(!dir.path().join(QUEUE_FILE_V1).exists(), "v1 file removed after migration");
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_utf8_in_one_record_loses_only_that_record_not_the_ones_after_it() {
    let dir = state_dir();
    let mut q = open(dir.path());
    for s in 0..4 {
        q.push(alarm(s), false);
    }
    drop(q);
    // Every record (v1 and v2 alike) ends with LF and holds no other: damage the second one.
    let path = dir.path().join(QUEUE_FILE);
    let mut bytes = std::fs::read(&path).expect("read");
    let second = bytes.iter().position(|b| *b == b'\n').expect("first LF") + 1;
    bytes[second + 40] = 0xff;
    std::fs::write(&path, &bytes).expect("write");
    let q = open(dir.path());
    assert_eq!(seqs(&q), [0, 2, 3]);
}

#[test]
fn invalid_utf8_in_one_v1_line_loses_only_that_line_when_migrating() {
    let dir = state_dir();
    let mut v1 = Vec::new();
    for i in 0..4u64 {
        let mut line = add_json(i, &alarm(i)).into_bytes();
        if i == 1 {
            line[30] = 0xff;
        }
        v1.extend_from_slice(&line);
        v1.push(b'\n');
    }
    v1.extend_from_slice(b"{\"op\":\"del\",\"id\":2}\n");
    v1.extend_from_slice(b"{\"op\":\"add\",\"id\":9,\"al"); // torn
    std::fs::write(dir.path().join(QUEUE_FILE_V1), &v1).expect("write v1");
    let q = open(dir.path());
    assert_eq!(seqs(&q), [0, 3]);
    drop(q);
    assert!(!dir.path().join(QUEUE_FILE_V1).exists());
    // Migrated once: the v2 file has them, the next open reads only it.
    let q = open(dir.path());
    assert_eq!(seqs(&q), [0, 3]);
    let damaged = dir.path().join(format!("{QUEUE_FILE_V1}.damaged"));
    assert_eq!(
        std::fs::read(damaged).expect("copy of the damaged v1 file"),
        v1
    );
}

#[test]
fn an_alarm_appended_after_a_torn_record_survives_a_restart() {
    let dir = state_dir();
    let mut q = open(dir.path());
    q.push(alarm(0), false);
    // A torn write (the first half of a record, as a full disk leaves it) at the end of the
    // file, then a write that succeeds: it lands right behind the fragment.
    let path = dir.path().join(QUEUE_FILE);
    let bytes = std::fs::read(&path).expect("read");
    let fragment = bytes[..bytes.len() / 2].to_vec();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    std::io::Write::write_all(&mut f, &fragment).expect("append fragment");
    drop(f);
    let (_, out) = q.push(alarm(1), false);
    assert!(out.io_error.is_none());
    drop(q);
    let q = open(dir.path());
    assert_eq!(seqs(&q), [0, 1]);
}

/// Environment variable that makes [`disk_full_child_process`] run (in a child process: it sets
/// RLIMIT_FSIZE, which applies to the whole process).
const DISK_FULL_ENV: &str = "ANOMALYCLIP_TEST_QUEUE_DISK_FULL_DIR";

#[test]
#[ignore = "run by a_disk_full_append_then_a_good_one_loses_nothing, in a child process"]
fn disk_full_child_process() {
    let Some(dir) = std::env::var_os(DISK_FULL_ENV).map(PathBuf::from) else {
        return;
    };
    let mut initial = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid, initialised struct.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut initial) },
        0
    );
    let set_limit = |bytes: u64| {
        let lim = libc::rlimit {
            rlim_cur: bytes.min(initial.rlim_max),
            rlim_max: initial.rlim_max,
        };
        // SAFETY: setrlimit with a valid, initialised struct; this process runs only this test.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    };
    // SAFETY: ignoring SIGXFSZ so an over-limit write fails with EFBIG instead of killing us.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let path = dir.join(QUEUE_FILE);
    let mut q = open(&dir);
    assert!(q.push(alarm(0), false).1.io_error.is_none());
    let len = std::fs::metadata(&path).expect("meta").len();
    // The disk fills up 10 bytes into the next record.
    set_limit(len + 10);
    let (_, out) = q.push(alarm(1), false);
    assert!(out.io_error.is_some(), "the append must have failed");
    assert_eq!(
        std::fs::metadata(&path).expect("meta").len(),
        len + 10,
        "torn record on disk"
    );
    // Still full: the next one fails too, kept in memory.
    assert!(q.push(alarm(2), false).1.io_error.is_some());
    // Room again: the next write succeeds, and nothing is lost or glued.
    set_limit(initial.rlim_cur);
    let (_, out) = q.push(alarm(3), false);
    assert!(out.io_error.is_none(), "{:?}", out.io_error);
    assert_eq!(seqs(&q), [0, 1, 2, 3]);
    drop(q);
    let q = open(&dir);
    assert_eq!(seqs(&q), [0, 1, 2, 3]);
}

#[test]
fn a_disk_full_append_then_a_good_one_loses_nothing() {
    let dir = state_dir();
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "disk_full_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_FULL_ENV, dir.path())
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_record_id_near_u64_max_does_not_panic_at_start() {
    // v2: ids at the very top.
    let dir = state_dir();
    let mut file = Vec::new();
    for (i, id) in [u64::MAX - 2, u64::MAX - 1, u64::MAX]
        .into_iter()
        .enumerate()
    {
        file.extend(record(&add_json(id, &alarm(i as u64))));
    }
    std::fs::write(dir.path().join(QUEUE_FILE), &file).expect("write");
    let mut q = open(dir.path());
    assert_eq!(seqs(&q), [0, 1, 2]);
    let (id, out) = q.push(alarm(3), false);
    assert!(out.io_error.is_none());
    assert_eq!(id, Some(3), "renumbered at open");
    drop(q);
    assert_eq!(seqs(&open(dir.path())), [0, 1, 2, 3]);

    // v1, as the old code wrote it.
    let dir = state_dir();
    let v1 = format!("{}\n", add_json(u64::MAX, &alarm(7)));
    std::fs::write(dir.path().join(QUEUE_FILE_V1), v1).expect("write v1");
    let mut q = open(dir.path());
    assert_eq!(seqs(&q), [7]);
    q.push(alarm(8), false);
    drop(q);
    assert_eq!(seqs(&open(dir.path())), [7, 8]);
}

#[test]
fn a_v1_queue_is_migrated_in_order_behind_the_v2_alarms_each_alarm_once() {
    let dir = state_dir();
    let mut q = open(dir.path());
    q.push(alarm(0), false);
    q.push(alarm(1), false);
    drop(q);
    // A crash between the migration's rename and unlink leaves alarm 1 in both; alarm 5 is
    // newer (written by an older version after a downgrade).
    let v1 = format!("{}\n{}\n", add_json(10, &alarm(1)), add_json(11, &alarm(5)));
    std::fs::write(dir.path().join(QUEUE_FILE_V1), v1).expect("write v1");
    let q = open(dir.path());
    assert_eq!(seqs(&q), [0, 1, 5]);
    assert!(!dir.path().join(QUEUE_FILE_V1).exists());
}

#[test]
fn a_symlink_at_the_queue_file_is_refused_and_nothing_outside_is_written() {
    let root = state_dir();
    let state = root.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let outside = root.path().join("outside");
    std::fs::write(&outside, b"precious").expect("write");
    std::os::unix::fs::symlink(&outside, state.join(QUEUE_FILE)).expect("symlink");
    let err = AlarmQueue::open(&state, 10, WhenFull::DropOldest).expect_err("symlinked queue");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
}

#[test]
fn a_symlink_planted_at_the_queue_temp_name_is_not_followed() {
    let root = state_dir();
    let state = root.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let outside = root.path().join("outside");
    std::fs::write(&outside, b"precious").expect("write");
    let tmp = state.join(format!("{QUEUE_FILE}.tmp"));
    std::os::unix::fs::symlink(&outside, &tmp).expect("symlink");
    let mut q = AlarmQueue::open(&state, 10, WhenFull::DropOldest).expect("open");
    q.push(alarm(0), false);
    drop(q);
    // Planted again before the next rewrite (the one at open).
    std::os::unix::fs::symlink(&outside, &tmp).expect("symlink again");
    let q = AlarmQueue::open(&state, 10, WhenFull::DropOldest).expect("reopen");
    assert_eq!(seqs(&q), [0]);
    assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
    assert!(
        !std::fs::symlink_metadata(state.join(QUEUE_FILE))
            .expect("queue file")
            .file_type()
            .is_symlink()
    );
}
