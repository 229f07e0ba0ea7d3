//! MQTT publisher: one task that owns the broker connection, the topic contract and the on-disk
//! alarm queue.
//!
//! Input: calls on a [`PublisherHandle`] (Clone + Send, never blocks, usable from any thread):
//! results, alarms, masks, camera statuses, stats, shutdown.
//! Output, under `<prefix>` (default `anomalyclip/<node_id>`):
//!
//! | topic | QoS / retain | payload |
//! |---|---|---|
//! | `<prefix>/status` | 1 / yes | `online`, `stopped`; `offline` is the Last Will |
//! | `<prefix>/<camera>/status` | 1 / yes | `online`, `reconnecting`, `offline`, `error: <reason>` ([`CameraStatus`]) |
//! | `<prefix>/<camera>/result` | `result_qos` / no | flat JSON ≤ 512 bytes ([`FrameResult`]) |
//! | `<prefix>/<camera>/alarm` | 1 / yes | flat JSON ([`Alarm`]) |
//! | `<prefix>/<camera>/mask` | `mask_qos` / no | grayscale PNG with `tEXt` camera/seq/ts_ms |
//! | `<prefix>/stats` | 0 / no | JSON ([`Stats`]) |
//!
//! Delivery policy, per edge (named, bounded):
//! - alarms never drop while the disk has room: every alarm is appended (fsync'd) to the queue file
//!   `<state_dir>/alarm-queue.v1.jsonl` before it is sent, and removed only when the broker's
//!   PUBACK arrives. After a reconnect, or at start with a non-empty file, queued alarms are
//!   re-sent in order with `replayed: true`. The queue holds at most `queue_max_alarms`; when full,
//!   [`WhenFull`] decides (default: drop the oldest, so the latest state always gets through),
//!   and each drop is counted (`dropped_alarms`). Delivery is at least once: an alarm whose PUBACK
//!   was lost may arrive twice (same `seq`).
//! - results and masks are latest-value data: dropped (and counted) while disconnected or when
//!   the 256-slot input channel or the MQTT request channel is full.
//! - node and camera statuses are retained and re-published on every (re)connect, as is the latest
//!   acknowledged alarm of each camera that has nothing newer queued (`replayed: true`), so a
//!   broker restarted without persistence still shows the current state.
//! - a camera removed by a reload ([`PublisherHandle::forget_camera`]) is forgotten: its status and
//!   last alarm are no longer re-published, and its retained `status` and `alarm` topics are
//!   cleared (an empty retained message, QoS 1) once its queued alarms are delivered; a clear not
//!   acknowledged before a disconnect is re-sent after the reconnect.
//!
//! Failure modes: broker unreachable at start or later → reconnect with capped exponential
//! backoff (with jitter) between `reconnect_min` and `reconnect_max`, counted in `reconnects`;
//! disk queue write error → alarm kept in memory only, logged, counted (`queue_errors`); TLS files
//! unreadable or the queue unusable at start → [`PublisherError`] from [`Publisher::spawn`].
//!
//! Clean stop ([`PublisherHandle::shutdown`], or all handles dropped): queued alarms are flushed,
//! every camera is published `offline`, the node `stopped` (retained), then DISCONNECT, all within
//! the deadline; what is left in the queue stays on disk for the next start.
//!
//! Design: rumqttc's `EventLoop` is polled in a child task that forwards events; each connection
//! attempt gets a fresh client/event loop (clean session), so nothing rumqttc buffered for a dead
//! connection is sent later behind our back. Packet ids are matched to our messages by the order
//! of `Outgoing::Publish` events (the event loop handles requests in FIFO order).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use crate::config::is_valid_name;
use crate::payload::{Alarm, CameraStatus, FrameResult, MqttStats, Stats};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// What to do with a new alarm when the disk queue is full (`[mqtt] queue_when_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Discard the oldest queued alarm (the newest state always gets through).
    DropOldest,
    /// Discard the new alarm (the history is kept as it was).
    DropNewest,
}

/// A secret string whose `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[mqtt.tls]`: TLS is on when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA certificate(s) (PEM) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub client_key_file: Option<PathBuf>,
}

/// `[mqtt]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// `None` = `anomalyclip-<node_id>`.
    pub client_id: Option<String>,
    /// `None` = `anomalyclip/<node_id>`.
    pub topic_prefix: Option<String>,
    /// Zero disables keep-alive pings.
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsConfig>,
    pub result_qos: QoS,
    pub mask_qos: QoS,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub queue_max_alarms: usize,
    pub queue_when_full: WhenFull,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: 1883,
            client_id: None,
            topic_prefix: None,
            keep_alive: Duration::from_secs(30),
            username: None,
            password: None,
            tls: None,
            result_qos: QoS::AtMostOnce,
            mask_qos: QoS::AtMostOnce,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            queue_max_alarms: 10_000,
            queue_when_full: WhenFull::DropOldest,
        }
    }
}

impl MqttConfig {
    /// The topic prefix in use for `node_id`.
    pub fn prefix_for(&self, node_id: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("anomalyclip/{node_id}"))
    }

    /// The client id in use for `node_id`.
    pub fn client_id_for(&self, node_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("anomalyclip-{node_id}"))
    }
}

/// Largest mask payload sent; larger ones are dropped and counted (the MQTT packet limit is
/// [`MAX_PACKET_BYTES`]).
pub const MAX_MASK_BYTES: usize = 512 * 1024;
/// rumqttc packet size limit, both directions.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Default deadline of the clean stop started when every handle is dropped.
pub const DEFAULT_STOP_DEADLINE: Duration = Duration::from_secs(5);
/// File name of the alarm queue inside the state directory (format version in the name).
pub const QUEUE_FILE: &str = "alarm-queue.v1.jsonl";

const DATA_CHANNEL: usize = 256;
const REQUEST_CHANNEL: usize = 128;
const INFLIGHT: u16 = 100;

/// Errors starting the publisher.
#[derive(Debug, Error)]
pub enum PublisherError {
    #[error("invalid node id {0:?}: use 1 to 64 of A-Z a-z 0-9 _ -")]
    NodeId(String),
    #[error("alarm queue in {path}: {source}")]
    Queue { path: PathBuf, source: io::Error },
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile { path: PathBuf, source: io::Error },
}

// ---------------------------------------------------------------------------------------------
// Disk queue
// ---------------------------------------------------------------------------------------------

/// One line of the queue file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record {
    /// An alarm was queued (written and fsync'd before it is sent).
    Add { id: u64, alarm: Alarm },
    /// The alarm with this id was acknowledged by the broker, or dropped because the queue was
    /// full (not fsync'd: a lost `del` only means a duplicate after a crash).
    Del { id: u64 },
}

#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    alarm: Alarm,
    /// Send with `replayed: true`.
    replay: bool,
    /// Handed to the current connection.
    sent: bool,
}

/// What [`AlarmQueue::push`] did.
#[derive(Debug, Default)]
pub struct PushOutcome {
    /// An alarm discarded by the full-queue policy (the oldest, or the new one).
    pub dropped: Option<Alarm>,
    /// The write failed; the alarm is kept in memory only.
    pub io_error: Option<io::Error>,
}

/// Bounded, append-only, fsync'd alarm queue.
///
/// Format: JSON lines, `{"op":"add","id":N,"alarm":{…}}` and `{"op":"del","id":N}`. On open, the
/// live entries (adds without a del) are restored in order, a torn last line (crash during a
/// write) or a corrupt line is skipped with a warning, and the file is rewritten atomically with
/// just the live entries. The file is truncated whenever the queue becomes empty, and rewritten
/// when dead records dominate it.
#[derive(Debug)]
pub struct AlarmQueue {
    path: PathBuf,
    file: Option<File>,
    entries: VecDeque<Entry>,
    next_id: u64,
    max: usize,
    when_full: WhenFull,
    records: usize,
}

impl AlarmQueue {
    /// Opens (creating `dir` and the file if needed) and restores the queue. Restored alarms
    /// will be sent with `replayed: true`.
    pub fn open(dir: &Path, max: usize, when_full: WhenFull) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(QUEUE_FILE);
        let mut entries: VecDeque<Entry> = VecDeque::new();
        let mut next_id = 0;
        match File::open(&path) {
            Ok(f) => {
                let mut reader = BufReader::new(f);
                let mut line = String::new();
                let mut n = 0usize;
                loop {
                    line.clear();
                    let read = match reader.read_line(&mut line) {
                        Ok(read) => read,
                        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                            warn!(path = %path.display(), "alarm queue: invalid UTF-8, rest of file skipped");
                            break;
                        }
                        Err(e) => return Err(e),
                    };
                    if read == 0 {
                        break;
                    }
                    n += 1;
                    if !line.ends_with('\n') {
                        warn!(path = %path.display(), line = n, "alarm queue: torn last record (crash during write) skipped");
                        break;
                    }
                    match serde_json::from_str::<Record>(line.trim_end()) {
                        Ok(Record::Add { id, alarm }) => {
                            next_id = next_id.max(id + 1);
                            entries.push_back(Entry {
                                id,
                                alarm,
                                replay: true,
                                sent: false,
                            });
                        }
                        Ok(Record::Del { id }) => entries.retain(|e| e.id != id),
                        Err(e) => {
                            warn!(path = %path.display(), line = n, error = %e, "alarm queue: corrupt record skipped");
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut q = Self {
            path,
            file: None,
            entries,
            next_id,
            max: max.max(1),
            when_full,
            records: 0,
        };
        while q.entries.len() > q.max {
            q.entries.pop_front();
        }
        if !q.entries.is_empty() {
            info!(path = %q.path.display(), alarms = q.entries.len(), "alarm queue restored; will replay after connecting");
        }
        q.rewrite()?;
        Ok(q)
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
    pub fn alarms(&self) -> impl Iterator<Item = &Alarm> {
        self.entries.iter().map(|e| &e.alarm)
    }

    /// Appends an alarm (fsync'd) and returns its id, applying the full-queue policy first.
    pub fn push(&mut self, alarm: Alarm, replay: bool) -> (Option<u64>, PushOutcome) {
        let mut out = PushOutcome::default();
        if self.entries.len() >= self.max {
            match self.when_full {
                WhenFull::DropNewest => {
                    out.dropped = Some(alarm);
                    return (None, out);
                }
                WhenFull::DropOldest => {
                    if let Some(old) = self.entries.pop_front() {
                        if let Err(e) = self.append(&Record::Del { id: old.id }, false) {
                            out.io_error = Some(e);
                        }
                        out.dropped = Some(old.alarm);
                    }
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let rec = Record::Add {
            id,
            alarm: alarm.clone(),
        };
        if let Err(e) = self.append(&rec, true) {
            out.io_error = Some(e);
        }
        self.entries.push_back(Entry {
            id,
            alarm,
            replay,
            sent: false,
        });
        if self.records > 2 * self.entries.len() + 1024
            && let Err(e) = self.rewrite()
        {
            out.io_error = Some(e);
        }
        (Some(id), out)
    }

    /// Removes an acknowledged alarm; returns it (None if it was dropped meanwhile).
    pub fn ack(&mut self, id: u64) -> io::Result<Option<Alarm>> {
        let Some(pos) = self.entries.iter().position(|e| e.id == id) else {
            return Ok(None);
        };
        let entry = self.entries.remove(pos);
        if self.entries.is_empty() {
            self.truncate()?;
        } else if self.records > 2 * self.entries.len() + 1024 {
            self.rewrite()?;
        } else {
            self.append(&Record::Del { id }, false)?;
        }
        Ok(entry.map(|e| e.alarm))
    }

    /// After a lost connection: everything is to be sent again, marked replayed.
    fn mark_all_unsent(&mut self) {
        for e in &mut self.entries {
            e.sent = false;
            e.replay = true;
        }
    }

    fn has_camera(&self, camera: &str) -> bool {
        self.entries.iter().any(|e| e.alarm.camera == camera)
    }

    fn append(&mut self, rec: &Record, sync: bool) -> io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
        line.push(b'\n');
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                // A previous failure closed it: try again.
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
                self.file.insert(f)
            }
        };
        let res = file
            .write_all(&line)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        match res {
            Ok(()) => {
                self.records += 1;
                Ok(())
            }
            Err(e) => {
                // Reopen next time; a partial line is skipped at the next open.
                self.file = None;
                Err(e)
            }
        }
    }

    fn truncate(&mut self) -> io::Result<()> {
        let f = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            ),
        };
        f.set_len(0)?;
        self.records = 0;
        Ok(())
    }

    /// Writes the live entries to a temporary file, fsyncs it, renames it over the queue file and
    /// fsyncs the directory; then reopens for appending.
    fn rewrite(&mut self) -> io::Result<()> {
        self.file = None;
        let tmp = self.path.with_extension("jsonl.tmp");
        {
            let mut f = File::create(&tmp)?;
            let mut buf = Vec::new();
            for e in &self.entries {
                let rec = Record::Add {
                    id: e.id,
                    alarm: e.alarm.clone(),
                };
                serde_json::to_writer(&mut buf, &rec).map_err(io::Error::other)?;
                buf.push(b'\n');
            }
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.records = self.entries.len();
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Handle
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    connected: AtomicBool,
    published: AtomicU64,
    reconnects: AtomicU64,
    dropped_results: AtomicU64,
    dropped_masks: AtomicU64,
    queued_alarms: AtomicU64,
    dropped_alarms: AtomicU64,
    queue_errors: AtomicU64,
    /// Unix ms of the last message the broker took (QoS 0 written, QoS 1/2 acknowledged); 0 = never.
    last_progress_ms: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> MqttStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MqttStats {
            connected: self.connected.load(Ordering::Relaxed),
            published: r(&self.published),
            reconnects: r(&self.reconnects),
            dropped_results: r(&self.dropped_results),
            dropped_masks: r(&self.dropped_masks),
            queued_alarms: r(&self.queued_alarms),
            dropped_alarms: r(&self.dropped_alarms),
            queue_errors: r(&self.queue_errors),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Ctl {
    Alarm(Alarm),
    CameraStatus(String, CameraStatus),
    Forget(String),
    Shutdown(Duration),
}

enum Data {
    Result(FrameResult),
    Mask(String, Vec<u8>),
    Stats(Box<Stats>),
}

/// Cheap, cloneable, thread-safe handle to the publisher task. No method blocks or awaits.
#[derive(Clone)]
pub struct PublisherHandle {
    ctl: mpsc::UnboundedSender<Ctl>,
    data: mpsc::Sender<Data>,
    shared: Arc<Shared>,
}

impl PublisherHandle {
    /// Publishes a scored frame on `<prefix>/<camera>/result`. Returns false if it was dropped
    /// (disconnected or backpressure; counted in `dropped_results`).
    pub fn result(&self, r: FrameResult) -> bool {
        if !self.shared.connected.load(Ordering::Relaxed)
            || self.data.try_send(Data::Result(r)).is_err()
        {
            self.shared.dropped_results.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Publishes a mask PNG (see [`crate::payload::mask_png`]) on `<prefix>/<camera>/mask`.
    /// Returns false if it was dropped (counted in `dropped_masks`).
    pub fn mask(&self, camera: &str, png: Vec<u8>) -> bool {
        if !self.shared.connected.load(Ordering::Relaxed)
            || png.len() > MAX_MASK_BYTES
            || self
                .data
                .try_send(Data::Mask(camera.to_owned(), png))
                .is_err()
        {
            self.shared.dropped_masks.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues a debounced alarm transition: written to the disk queue, published on
    /// `<prefix>/<camera>/alarm` (QoS 1, retained) as soon as the broker is reachable.
    /// Returns false only if the publisher task has ended.
    pub fn alarm(&self, a: Alarm) -> bool {
        if self.ctl.send(Ctl::Alarm(a)).is_err() {
            error!("alarm after the publisher stopped: not delivered");
            return false;
        }
        true
    }

    /// Sets a camera's status; published (QoS 1, retained) when it changes and on every reconnect.
    pub fn camera_status(&self, camera: &str, status: CameraStatus) {
        let _ = self.ctl.send(Ctl::CameraStatus(camera.to_owned(), status));
    }

    /// Forgets a camera that was removed: its status and alarm are no longer re-published on
    /// reconnect, and its retained `status` and `alarm` topics are cleared (empty retained
    /// messages), after any of its alarms still queued. A later status or alarm of the same name
    /// cancels the clear (the camera is back).
    pub fn forget_camera(&self, camera: &str) {
        let _ = self.ctl.send(Ctl::Forget(camera.to_owned()));
    }

    /// Publishes a stats report on `<prefix>/stats`; its `mqtt` part is filled in by the
    /// publisher. Dropped silently when disconnected.
    pub fn stats(&self, s: Stats) {
        if self.shared.connected.load(Ordering::Relaxed) {
            let _ = self.data.try_send(Data::Stats(Box::new(s)));
        }
    }

    /// Starts the clean stop: flush queued alarms, cameras `offline`, node `stopped`, DISCONNECT,
    /// within `deadline`. Await the task's `JoinHandle` to know when it is done.
    pub fn shutdown(&self, deadline: Duration) {
        let _ = self.ctl.send(Ctl::Shutdown(deadline));
    }

    /// Publisher counters (for `stats` and metrics).
    pub fn counters(&self) -> MqttStats {
        self.shared.snapshot()
    }

    /// Whether the broker connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// When the broker last took a message (QoS 0 written, QoS 1/2 acknowledged): progress for
    /// the systemd watchdog. `None` before the first one.
    pub fn last_progress(&self) -> Option<SystemTime> {
        match self.shared.last_progress_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher task
// ---------------------------------------------------------------------------------------------

/// Spawns the publisher.
pub struct Publisher;

impl Publisher {
    /// Opens the alarm queue in `state_dir`, reads the TLS files, and spawns the publisher task
    /// (and its connection task) on the current tokio runtime. The first connection attempt is
    /// immediate; a broker that is down is not an error.
    pub fn spawn(
        cfg: &MqttConfig,
        node_id: &str,
        state_dir: &Path,
    ) -> Result<(PublisherHandle, JoinHandle<()>), PublisherError> {
        if !is_valid_name(node_id) {
            return Err(PublisherError::NodeId(node_id.to_owned()));
        }
        let queue = AlarmQueue::open(state_dir, cfg.queue_max_alarms, cfg.queue_when_full)
            .map_err(|source| PublisherError::Queue {
                path: state_dir.to_owned(),
                source,
            })?;
        let tls = match &cfg.tls {
            None => None,
            Some(t) => {
                let read = |p: &Path| {
                    std::fs::read(p).map_err(|source| PublisherError::TlsFile {
                        path: p.to_owned(),
                        source,
                    })
                };
                let ca = read(&t.ca_file)?;
                let client_auth = match (&t.client_cert_file, &t.client_key_file) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                };
                Some((ca, client_auth))
            }
        };

        let shared = Arc::new(Shared::default());
        shared
            .queued_alarms
            .store(queue.len() as u64, Ordering::Relaxed);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::channel(DATA_CHANNEL);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let prefix = cfg.prefix_for(node_id);
        let worker = Worker {
            cfg: cfg.clone(),
            client_id: cfg.client_id_for(node_id),
            node_status_topic: format!("{prefix}/status"),
            prefix,
            tls,
            queue,
            shared: shared.clone(),
            statuses: BTreeMap::new(),
            last_alarm: BTreeMap::new(),
            pending_clear: BTreeMap::new(),
            conn: None,
            generation: 0,
            backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
            next_attempt: Instant::now(),
            outage_logged: false,
            ever_connected: false,
            alarm_blocked: false,
            ev_tx,
            ev_rx,
            ctl_rx,
            data_rx,
            stop: None,
        };
        let task = tokio::spawn(worker.run());
        Ok((
            PublisherHandle {
                ctl: ctl_tx,
                data: data_tx,
                shared,
            },
            task,
        ))
    }
}

/// Aborts the connection task when dropped, so an aborted publisher also drops its socket.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a publish in flight belongs to.
#[derive(Debug, Clone, PartialEq)]
enum Sent {
    Alarm(u64),
    AlarmState,
    /// The clear of a forgotten camera's retained alarm (sent after its status clear).
    Cleared(String),
    Result,
    Mask,
    Stats,
    Status,
    Stopped,
}

struct Conn {
    generation: u64,
    client: AsyncClient,
    _poll: AbortOnDrop,
    up: bool,
    /// Requests handed to rumqttc, not yet seen as `Outgoing::Publish`.
    fifo: VecDeque<(Sent, QoS)>,
    /// QoS 1/2 publishes written, awaiting PUBACK/PUBCOMP.
    inflight: HashMap<u16, Sent>,
}

struct Stop {
    deadline: Instant,
    stopped_sent: bool,
    stopped_acked: bool,
    disconnect_sent: bool,
    done: bool,
}

/// Capped exponential backoff with "equal jitter": the wait is in [d/2, d], d doubling from
/// `min` up to `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
    rng: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Self {
            min,
            max: max.max(min),
            cur: min,
            rng: seed | 1,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = d / 2;
        let span = (d - half).as_micros() as u64 + 1;
        half + Duration::from_micros(self.rng % span)
    }

    fn reset(&mut self) {
        self.cur = self.min;
    }
}

type ConnEvent = (u64, Result<Event, ConnectionError>);

/// PEM bytes read at start: the CA, and the client certificate and key for mutual TLS.
type TlsBytes = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);

struct Worker {
    cfg: MqttConfig,
    client_id: String,
    prefix: String,
    node_status_topic: String,
    tls: Option<TlsBytes>,
    queue: AlarmQueue,
    shared: Arc<Shared>,
    statuses: BTreeMap<String, CameraStatus>,
    /// Latest acknowledged alarm per camera (re-published on reconnect).
    last_alarm: BTreeMap<String, Alarm>,
    /// Forgotten cameras whose retained topics still need clearing; `true` once the clears
    /// were handed to the current connection.
    pending_clear: BTreeMap<String, bool>,
    conn: Option<Conn>,
    generation: u64,
    backoff: Backoff,
    next_attempt: Instant,
    outage_logged: bool,
    ever_connected: bool,
    /// The request channel was full while sending alarms: retry on a timer.
    alarm_blocked: bool,
    ev_tx: mpsc::UnboundedSender<ConnEvent>,
    ev_rx: mpsc::UnboundedReceiver<ConnEvent>,
    ctl_rx: mpsc::UnboundedReceiver<Ctl>,
    data_rx: mpsc::Receiver<Data>,
    stop: Option<Stop>,
}

impl Worker {
    async fn run(mut self) {
        info!(prefix = %self.prefix, host = %self.cfg.host, port = self.cfg.port, "mqtt publisher started");
        let mut ctl_open = true;
        loop {
            if self.stop.as_ref().is_some_and(|s| s.done) {
                break;
            }
            let connect_at = self.conn.is_none().then_some(self.next_attempt);
            let deadline = self.stop.as_ref().map(|s| s.deadline);
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                biased;
                Some((generation, ev)) = self.ev_rx.recv() => self.on_event(generation, ev),
                ctl = self.ctl_rx.recv(), if ctl_open => match ctl {
                    Some(c) => self.on_ctl(c),
                    None => {
                        ctl_open = false;
                        self.begin_stop(DEFAULT_STOP_DEADLINE);
                    }
                },
                Some(d) = self.data_rx.recv(), if self.stop.is_none() => self.on_data(d),
                _ = sleep_until(connect_at.unwrap_or(far)), if connect_at.is_some() => self.connect(),
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    warn!(
                        queued_alarms = self.queue.len(),
                        "mqtt publisher: stop deadline reached; unsent alarms stay in the disk queue"
                    );
                    break;
                }
                _ = sleep(Duration::from_millis(50)), if self.alarm_blocked => {
                    self.send_alarms();
                    self.advance_stop();
                }
            }
        }
        self.shared.connected.store(false, Ordering::Relaxed);
        self.conn = None;
        info!(queued_alarms = self.queue.len(), "mqtt publisher stopped");
    }

    fn is_up(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.up)
    }

    fn topic(&self, camera: &str, leaf: &str) -> Option<String> {
        if is_valid_name(camera) {
            Some(format!("{}/{camera}/{leaf}", self.prefix))
        } else {
            warn!(
                camera,
                "invalid camera name (not a safe topic level): message dropped"
            );
            None
        }
    }

    /// Hands a publish to rumqttc; false if not connected or its request channel is full.
    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        sent: Sent,
    ) -> bool {
        let Some(conn) = self.conn.as_mut().filter(|c| c.up) else {
            return false;
        };
        match conn.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                conn.fifo.push_back((sent, qos));
                true
            }
            Err(e) => {
                debug!(error = %e, "mqtt request not accepted");
                false
            }
        }
    }

    fn connect(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        let mut o = MqttOptions::new(self.client_id.clone(), self.cfg.host.clone(), self.cfg.port);
        o.set_keep_alive(if self.cfg.keep_alive.is_zero() {
            Duration::ZERO
        } else {
            self.cfg.keep_alive.max(Duration::from_secs(1))
        });
        o.set_clean_session(true);
        o.set_last_will(LastWill::new(
            self.node_status_topic.clone(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        o.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        o.set_inflight(INFLIGHT);
        o.set_request_channel_capacity(REQUEST_CHANNEL);
        if let Some(user) = &self.cfg.username {
            let pass = self
                .cfg
                .password
                .as_ref()
                .map(|p| p.0.clone())
                .unwrap_or_default();
            o.set_credentials(user.clone(), pass);
        }
        if let Some((ca, client_auth)) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: ca.clone(),
                alpn: None,
                client_auth: client_auth.clone(),
            }));
        }
        let (client, mut eventloop) = AsyncClient::new(o, REQUEST_CHANNEL);
        let tx = self.ev_tx.clone();
        let poll = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let end = ev.is_err();
                if tx.send((generation, ev)).is_err() || end {
                    break;
                }
            }
        });
        debug!(generation, "connecting to broker");
        self.conn = Some(Conn {
            generation,
            client,
            _poll: AbortOnDrop(poll),
            up: false,
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
        });
    }

    fn on_event(&mut self, generation: u64, ev: Result<Event, ConnectionError>) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.generation != generation {
            return;
        }
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => self.on_connected(),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => match conn.fifo.pop_front() {
                Some((sent, QoS::AtMostOnce)) => self.completed(sent),
                Some((sent, _)) => {
                    conn.inflight.insert(pkid, sent);
                }
                None => warn!(pkid, "mqtt: publish event without a pending request"),
            },
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(sent) = conn.inflight.remove(&ack.pkid) {
                    self.completed(sent);
                }
            }
            Ok(Event::Incoming(Packet::PubComp(comp))) => {
                if let Some(sent) = conn.inflight.remove(&comp.pkid) {
                    self.completed(sent);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if let Some(stop) = &mut self.stop {
                    stop.done = true;
                }
            }
            Ok(_) => {}
            Err(e) => self.on_connection_error(e),
        }
        if self.alarm_blocked {
            self.send_alarms();
        }
        self.advance_stop();
    }

    fn on_connected(&mut self) {
        if let Some(conn) = &mut self.conn {
            conn.up = true;
        }
        self.shared.connected.store(true, Ordering::Relaxed);
        if self.ever_connected {
            self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.ever_connected = true;
        self.outage_logged = false;
        self.backoff.reset();
        info!(host = %self.cfg.host, port = self.cfg.port, queued_alarms = self.queue.len(), "connected to mqtt broker");

        if self.stop.is_none() {
            self.publish(
                self.node_status_topic.clone(),
                QoS::AtLeastOnce,
                true,
                b"online".to_vec(),
                Sent::Status,
            );
        }
        let statuses: Vec<(String, CameraStatus)> = self
            .statuses
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (camera, status) in statuses {
            if let Some(topic) = self.topic(&camera, "status") {
                self.publish(
                    topic,
                    QoS::AtLeastOnce,
                    true,
                    status.payload().into_bytes(),
                    Sent::Status,
                );
            }
        }
        let states: Vec<Alarm> = self
            .last_alarm
            .values()
            .filter(|a| !self.queue.has_camera(&a.camera))
            .cloned()
            .collect();
        for a in states {
            if let Some(topic) = self.topic(&a.camera, "alarm") {
                self.publish(
                    topic,
                    QoS::AtLeastOnce,
                    true,
                    a.to_json(true),
                    Sent::AlarmState,
                );
            }
        }
        self.send_alarms();
        self.send_clears();
    }

    fn on_connection_error(&mut self, e: ConnectionError) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        self.shared.connected.store(false, Ordering::Relaxed);
        if let Some(stop) = &mut self.stop {
            if stop.disconnect_sent {
                stop.done = true;
                return;
            }
            stop.stopped_sent = false;
            stop.stopped_acked = false;
        }
        if conn.up {
            warn!(error = %e, queued_alarms = self.queue.len(), "mqtt connection lost; reconnecting");
        } else if !self.outage_logged {
            warn!(error = %e, host = %self.cfg.host, port = self.cfg.port, "cannot connect to mqtt broker; retrying with backoff");
        } else {
            debug!(error = %e, "mqtt connect attempt failed");
        }
        self.outage_logged = true;
        // Requests rumqttc never wrote are lost with the connection: count them.
        for (sent, _) in &conn.fifo {
            match sent {
                Sent::Result => {
                    self.shared.dropped_results.fetch_add(1, Ordering::Relaxed);
                }
                Sent::Mask => {
                    self.shared.dropped_masks.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        self.queue.mark_all_unsent();
        for handed in self.pending_clear.values_mut() {
            *handed = false;
        }
        self.alarm_blocked = false;
        self.next_attempt = Instant::now() + self.backoff.next();
    }

    fn completed(&mut self, sent: Sent) {
        self.shared.published.fetch_add(1, Ordering::Relaxed);
        self.shared
            .last_progress_ms
            .store(now_ms(), Ordering::Relaxed);
        match sent {
            Sent::Alarm(id) => {
                match self.queue.ack(id) {
                    Ok(Some(a)) => {
                        if !self.pending_clear.contains_key(&a.camera) {
                            self.last_alarm.insert(a.camera.clone(), a);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.shared.queue_errors.fetch_add(1, Ordering::Relaxed);
                        error!(error = %e, "alarm queue: cannot record acknowledgement (may replay a duplicate after restart)");
                    }
                }
                self.shared
                    .queued_alarms
                    .store(self.queue.len() as u64, Ordering::Relaxed);
                self.send_clears();
            }
            Sent::Cleared(camera) if self.pending_clear.get(&camera) == Some(&true) => {
                self.pending_clear.remove(&camera);
                info!(
                    camera,
                    "retained status and alarm of the removed camera cleared"
                );
            }
            Sent::Stopped => {
                if let Some(stop) = &mut self.stop {
                    stop.stopped_acked = true;
                }
            }
            _ => {}
        }
    }

    /// Sends the queued alarms not yet handed to this connection, in order.
    fn send_alarms(&mut self) {
        self.alarm_blocked = false;
        if !self.is_up() {
            return;
        }
        let pending: Vec<(u64, Alarm, bool)> = self
            .queue
            .entries
            .iter()
            .filter(|e| !e.sent)
            .map(|e| (e.id, e.alarm.clone(), e.replay))
            .collect();
        for (id, alarm, replay) in pending {
            let Some(topic) = self.topic(&alarm.camera, "alarm") else {
                // Unpublishable: drop it from the queue rather than block the ones behind it.
                let _ = self.queue.ack(id);
                continue;
            };
            if self.publish(
                topic,
                QoS::AtLeastOnce,
                true,
                alarm.to_json(replay),
                Sent::Alarm(id),
            ) {
                if let Some(e) = self.queue.entries.iter_mut().find(|e| e.id == id) {
                    e.sent = true;
                }
            } else {
                self.alarm_blocked = true;
                break;
            }
        }
    }

    /// Clears the retained `status` and `alarm` of each forgotten camera that has no alarm
    /// left in the queue (the clear must come after them), once per connection.
    fn send_clears(&mut self) {
        if !self.is_up() {
            return;
        }
        let due: Vec<String> = self
            .pending_clear
            .iter()
            .filter(|(camera, handed)| !**handed && !self.queue.has_camera(camera))
            .map(|(camera, _)| camera.clone())
            .collect();
        for camera in due {
            let (Some(status), Some(alarm)) =
                (self.topic(&camera, "status"), self.topic(&camera, "alarm"))
            else {
                self.pending_clear.remove(&camera);
                continue;
            };
            let handed = self.publish(status, QoS::AtLeastOnce, true, Vec::new(), Sent::Status)
                && self.publish(
                    alarm,
                    QoS::AtLeastOnce,
                    true,
                    Vec::new(),
                    Sent::Cleared(camera.clone()),
                );
            if !handed {
                break;
            }
            self.pending_clear.insert(camera, true);
        }
    }

    fn on_ctl(&mut self, c: Ctl) {
        match c {
            Ctl::Alarm(a) => {
                self.pending_clear.remove(&a.camera);
                let replay = !self.is_up();
                let camera = a.camera.clone();
                let (_, out) = self.queue.push(a, replay);
                if let Some(dropped) = out.dropped {
                    self.shared.dropped_alarms.fetch_add(1, Ordering::Relaxed);
                    warn!(camera = %dropped.camera, seq = dropped.seq, policy = ?self.cfg.queue_when_full, "alarm queue full: alarm dropped");
                }
                if let Some(e) = out.io_error {
                    self.shared.queue_errors.fetch_add(1, Ordering::Relaxed);
                    error!(error = %e, camera, "alarm queue write failed: alarm kept in memory only");
                }
                self.shared
                    .queued_alarms
                    .store(self.queue.len() as u64, Ordering::Relaxed);
                self.send_alarms();
            }
            Ctl::CameraStatus(camera, status) => {
                self.pending_clear.remove(&camera);
                if self.statuses.get(&camera) == Some(&status) {
                    return;
                }
                if let Some(topic) = self.topic(&camera, "status") {
                    let payload = status.payload().into_bytes();
                    self.statuses.insert(camera, status);
                    self.publish(topic, QoS::AtLeastOnce, true, payload, Sent::Status);
                }
            }
            Ctl::Forget(camera) => {
                self.statuses.remove(&camera);
                self.last_alarm.remove(&camera);
                self.pending_clear.insert(camera, false);
                self.send_clears();
            }
            Ctl::Shutdown(d) => self.begin_stop(d),
        }
        self.advance_stop();
    }

    fn on_data(&mut self, d: Data) {
        match d {
            Data::Result(r) => {
                let ok = match self.topic(&r.camera, "result") {
                    Some(topic) => {
                        let qos = self.cfg.result_qos;
                        self.publish(topic, qos, false, r.to_json(), Sent::Result)
                    }
                    None => false,
                };
                if !ok {
                    self.shared.dropped_results.fetch_add(1, Ordering::Relaxed);
                }
            }
            Data::Mask(camera, png) => {
                let ok = match self.topic(&camera, "mask") {
                    Some(topic) => {
                        let qos = self.cfg.mask_qos;
                        self.publish(topic, qos, false, png, Sent::Mask)
                    }
                    None => false,
                };
                if !ok {
                    self.shared.dropped_masks.fetch_add(1, Ordering::Relaxed);
                }
            }
            Data::Stats(mut s) => {
                s.mqtt = self.shared.snapshot();
                let topic = format!("{}/stats", self.prefix);
                self.publish(topic, QoS::AtMostOnce, false, s.to_json(), Sent::Stats);
            }
        }
    }

    fn begin_stop(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        match &mut self.stop {
            Some(stop) => stop.deadline = stop.deadline.min(deadline),
            None => {
                info!(
                    deadline_ms = d.as_millis() as u64,
                    queued_alarms = self.queue.len(),
                    "mqtt publisher stopping"
                );
                self.stop = Some(Stop {
                    deadline,
                    stopped_sent: false,
                    stopped_acked: false,
                    disconnect_sent: false,
                    done: false,
                });
            }
        }
    }

    /// Moves the clean stop forward as far as the connection allows.
    fn advance_stop(&mut self) {
        let Some(stop) = &self.stop else {
            return;
        };
        if stop.done || stop.disconnect_sent || !self.is_up() {
            return;
        }
        if !stop.stopped_sent {
            // Alarms first (they are older), then the clears of removed cameras, then every
            // camera offline, then the node.
            self.send_alarms();
            if self.alarm_blocked {
                return;
            }
            self.send_clears();
            let cameras: Vec<String> = self.statuses.keys().cloned().collect();
            for camera in cameras {
                self.statuses.insert(camera.clone(), CameraStatus::Offline);
                if let Some(topic) = self.topic(&camera, "status") {
                    self.publish(
                        topic,
                        QoS::AtLeastOnce,
                        true,
                        b"offline".to_vec(),
                        Sent::Status,
                    );
                }
            }
            let sent = self.publish(
                self.node_status_topic.clone(),
                QoS::AtLeastOnce,
                true,
                b"stopped".to_vec(),
                Sent::Stopped,
            );
            if let Some(stop) = &mut self.stop {
                stop.stopped_sent = sent;
            }
            return;
        }
        let flushed = self.pending_clear.is_empty()
            && self
                .conn
                .as_ref()
                .is_some_and(|c| c.fifo.is_empty() && c.inflight.is_empty());
        if stop.stopped_acked && self.queue.is_empty() && flushed {
            let ok = self
                .conn
                .as_ref()
                .is_some_and(|c| c.client.try_disconnect().is_ok());
            if let Some(stop) = &mut self.stop {
                if ok {
                    stop.disconnect_sent = true;
                } else {
                    stop.done = true;
                }
            }
        }
    }
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
        }
    }

    fn seqs(q: &AlarmQueue) -> Vec<u64> {
        q.alarms().map(|a| a.seq).collect()
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
        // Rewritten on open: only live records remain.
        let text = std::fs::read_to_string(dir.path().join(QUEUE_FILE)).expect("read");
        assert_eq!(text.lines().count(), 4);
        assert!(!text.contains("\"del\""));
    }

    #[test]
    fn queue_skips_torn_and_corrupt_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("open");
        q.push(alarm(0), false);
        q.push(alarm(1), false);
        drop(q);
        let path = dir.path().join(QUEUE_FILE);
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.insert_str(0, "garbage line\n");
        text.push_str("{\"op\":\"add\",\"id\":9,\"alarm\":{\"camera\":\"c"); // torn
        std::fs::write(&path, text).expect("write");
        let mut q = AlarmQueue::open(dir.path(), 100, WhenFull::DropOldest).expect("reopen");
        assert_eq!(seqs(&q), vec![0, 1]);
        // New ids continue after the restored ones and appends land on a clean line.
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
        let lines = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        assert!(lines <= 2 * 10 + 1024 + 2, "{lines}");
        let ids: Vec<u64> = q.entries.iter().map(|e| e.id).collect();
        for id in ids.iter().take(9) {
            q.ack(*id).expect("ack");
        }
        let lines = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        assert!(lines < 1100, "{lines}");
        assert_eq!(seqs(&q), vec![699]);
    }

    #[test]
    fn backoff_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let waits: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(800)));
        assert!(waits[7] >= Duration::from_millis(400));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[test]
    fn handle_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<PublisherHandle>();
    }

    #[tokio::test]
    async fn spawn_rejects_a_bad_node_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Publisher::spawn(&MqttConfig::default(), "a/b", dir.path());
        assert!(matches!(r, Err(PublisherError::NodeId(_))));
    }

    #[test]
    fn prefix_and_client_id_defaults() {
        let c = MqttConfig::default();
        assert_eq!(c.prefix_for("n1"), "anomalyclip/n1");
        assert_eq!(c.client_id_for("n1"), "anomalyclip-n1");
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "\"***\"");
    }
}
