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
//! | `<prefix>/<camera>/inspect` | subscribed by [`requests`] (MQTT 5), 1 | trigger request (JSON), forwarded to the trigger stage with its response topic |
//! | `<prefix>/<camera>/inspection` | 1 / no | flat JSON ([`Inspection`]), through the inspection disk queue |
//! | `<prefix>/<camera>/ready` | 1 / yes | `true` / `false`: can a trigger be served now |
//! | `<prefix>/info` | 1 / yes | the birth certificate (JSON, set by the daemon), at every connect and on change |
//! | `<prefix>/cmd` | subscribed by [`requests`], 1 (with `[commands]`) | command request (JSON, [`crate::commands`]); retained ones are ignored |
//! | `<prefix>/cmd/ack` | 1 / no | the acknowledgement of each command ([`crate::commands::Ack`]) |
//!
//! Delivery policy, per edge (named, bounded):
//! - alarms never drop while the disk has room: every alarm is appended (fsync'd) to the queue file
//!   `<state_dir>/alarm-queue.v2` before it is sent, and removed only when the broker's PUBACK
//!   arrives (file format, checksums, how a damaged file is read: [`queue`]). After a reconnect,
//!   or at start with a non-empty file, queued alarms are re-sent in order with `replayed: true`.
//!   The queue holds at most `queue_max_alarms`; when full, [`WhenFull`] decides (default: drop
//!   the oldest, so the latest state always gets through), and each drop is counted
//!   (`dropped_alarms`). Delivery is at least once: an alarm whose PUBACK was lost may arrive
//!   twice (same `seq`); consumers de-duplicate on (camera, seq, active).
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
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use crate::payload::{
    Alarm, CameraStatus, FrameResult, Inspection, MqttStats, Stats, is_valid_name,
};

pub mod queue;
pub use queue::{
    AlarmQueue, INSPECTION_QUEUE_FILE, InspectionQueue, PushOutcome, QUEUE_FILE, QUEUE_FILE_V1,
};

/// Most inspection results kept in the disk queue while the broker is away (the oldest is
/// dropped, counted and logged beyond it).
pub const INSPECTION_QUEUE_MAX: usize = 10_000;
/// Capacity of the channel of trigger requests to the trigger stage; a request beyond it is
/// dropped with a warning (the stage answers thousands per second, so only a stalled stage
/// fills it).
pub const INBOX_CHANNEL: usize = 4096;

/// A trigger request received by the request connection ([`requests`]) on
/// `<prefix>/<camera>/inspect`.
#[derive(Debug)]
pub struct Inbound {
    /// The camera level of the topic (not checked against the configured cameras).
    pub camera: String,
    pub payload: Vec<u8>,
    /// Arrival, monotonic and Unix ms.
    pub at: std::time::Instant,
    pub at_unix_ms: u64,
    /// The MQTT 5 response topic and correlation data, when the requester set them.
    pub response: Option<requests::ResponseTo>,
}

pub mod requests;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

pub mod config;

pub use config::{MqttConfig, Secret, TlsConfig, WhenFull};

/// Largest mask payload sent; larger ones are dropped and counted (the MQTT packet limit is
/// [`MAX_PACKET_BYTES`]).
pub const MAX_MASK_BYTES: usize = 512 * 1024;
/// rumqttc packet size limit, both directions.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Default deadline of the clean stop started when every handle is dropped.
pub const DEFAULT_STOP_DEADLINE: Duration = Duration::from_secs(5);

const DATA_CHANNEL: usize = 256;
const REQUEST_CHANNEL: usize = 128;
/// Command acknowledgements waiting for the connection (a storm of commands, a full request
/// channel, the broker away); beyond it the oldest is dropped and logged.
pub const COMMAND_ACKS_MAX: usize = 4096;
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
    queued_inspections: AtomicU64,
    dropped_inspections: AtomicU64,
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
    Inspection(Box<Inspection>),
    Ready(String, bool),
    CommandAck(Vec<u8>),
    Info(Vec<u8>),
    CameraStatus(String, CameraStatus),
    /// A retained message under a camera or region (`unit`), e.g. its `calibration`.
    Retained(String, &'static str, Vec<u8>),
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

    /// Queues an inspection result: written to the inspection disk queue, published on
    /// `<prefix>/<camera>/inspection` (QoS 1, not retained) as soon as the broker is reachable,
    /// re-sent with `replayed: true` after a reconnect or restart until acknowledged.
    pub fn inspection(&self, i: Inspection) -> bool {
        if self.ctl.send(Ctl::Inspection(Box::new(i))).is_err() {
            error!("inspection result after the publisher stopped: not delivered");
            return false;
        }
        true
    }

    /// Sets the birth certificate, published retained on `<prefix>/info` now and at every
    /// connect.
    pub fn info(&self, payload: Vec<u8>) {
        let _ = self.ctl.send(Ctl::Info(payload));
    }

    /// Sets a camera's retained `ready` flag (published when it changes and on reconnect).
    pub fn ready(&self, camera: &str, ready: bool) {
        let _ = self.ctl.send(Ctl::Ready(camera.to_owned(), ready));
    }

    /// Publishes a command acknowledgement on `<prefix>/cmd/ack` (QoS 1, not retained; lost if
    /// the broker is away: the command came over the same connection, so the sender retries).
    pub fn command_ack(&self, payload: Vec<u8>) {
        let _ = self.ctl.send(Ctl::CommandAck(payload));
    }

    /// Inspection results queued on disk (sent but unacknowledged included), and those dropped
    /// because the queue was full.
    pub fn inspection_counters(&self) -> (u64, u64) {
        (
            self.shared.queued_inspections.load(Ordering::Relaxed),
            self.shared.dropped_inspections.load(Ordering::Relaxed),
        )
    }

    /// Sets a camera's status; published (QoS 1, retained) when it changes and on every reconnect.
    pub fn camera_status(&self, camera: &str, status: CameraStatus) {
        let _ = self.ctl.send(Ctl::CameraStatus(camera.to_owned(), status));
    }

    /// Publishes a retained message on `<prefix>/<unit>/<leaf>` (QoS 1), re-published on every
    /// reconnect until the unit is forgotten; `unit` is `camera` or `camera/region`.
    pub fn retained(&self, unit: &str, leaf: &'static str, payload: Vec<u8>) {
        let _ = self.ctl.send(Ctl::Retained(unit.to_owned(), leaf, payload));
    }

    /// Forgets a camera that was removed: its status and alarm are no longer re-published on
    /// reconnect, and its retained `status`, `alarm`, `calibration` and `ready` topics are
    /// cleared (empty retained messages), after any of its alarms still queued. A later status,
    /// alarm or `ready = true` of the same name cancels the clear (the camera is back); a late
    /// `ready = false` is ignored.
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
        let tls = read_tls(cfg)?;

        let iqueue = InspectionQueue::open(state_dir, INSPECTION_QUEUE_MAX, WhenFull::DropOldest)
            .map_err(|source| PublisherError::Queue {
            path: state_dir.to_owned(),
            source,
        })?;
        let shared = Arc::new(Shared::default());
        shared
            .queued_alarms
            .store(queue.len() as u64, Ordering::Relaxed);
        shared
            .queued_inspections
            .store(iqueue.len() as u64, Ordering::Relaxed);
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
            iqueue,
            ready: BTreeMap::new(),
            acks: std::collections::VecDeque::new(),
            info: None,
            shared: shared.clone(),
            statuses: BTreeMap::new(),
            last_alarm: BTreeMap::new(),
            retained: BTreeMap::new(),
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
    Inspection(u64),
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

/// Reads the TLS files of `cfg` (the CA, and the client certificate and key for mutual TLS).
pub(crate) fn read_tls(cfg: &MqttConfig) -> Result<Option<TlsBytes>, PublisherError> {
    let Some(t) = &cfg.tls else {
        return Ok(None);
    };
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
    Ok(Some((ca, client_auth)))
}

/// The connection options every connection of the daemon shares: `[mqtt]`'s broker, keep-alive,
/// credentials and TLS, a clean session, `client_id`.
pub(crate) fn base_options(
    cfg: &MqttConfig,
    client_id: &str,
    tls: Option<&TlsBytes>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id.to_owned(), cfg.host.clone(), cfg.port);
    o.set_keep_alive(keep_alive(cfg));
    o.set_clean_session(true);
    if let Some((user, pass)) = login(cfg) {
        o.set_credentials(user, pass);
    }
    if let Some(tls) = tls {
        o.set_transport(tls_transport(tls));
    }
    o
}

/// `[mqtt] keep_alive_s` as every connection uses it (0 = off, else at least 1 s).
pub(crate) fn keep_alive(cfg: &MqttConfig) -> Duration {
    if cfg.keep_alive.is_zero() {
        Duration::ZERO
    } else {
        cfg.keep_alive.max(Duration::from_secs(1))
    }
}

/// `[mqtt]`'s user name and password, when set.
pub(crate) fn login(cfg: &MqttConfig) -> Option<(String, String)> {
    let user = cfg.username.as_ref()?;
    let pass = cfg
        .password
        .as_ref()
        .map(|p| p.0.clone())
        .unwrap_or_default();
    Some((user.clone(), pass))
}

/// The TLS transport from the PEM bytes read at start.
pub(crate) fn tls_transport((ca, client_auth): &TlsBytes) -> Transport {
    Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca.clone(),
        alpn: None,
        client_auth: client_auth.clone(),
    })
}

/// Capped exponential backoff with "equal jitter": the wait is in [d/2, d], d doubling from
/// `min` up to `max`.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
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

    pub(crate) fn next(&mut self) -> Duration {
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

    pub(crate) fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// One event of a connection, tagged with the connection's generation.
pub(crate) type ConnEvent = (u64, Result<Event, ConnectionError>);

/// Polls one connection's event loop into `tx` until it fails or `tx` is gone (shared with the
/// Sparkplug connection).
pub(crate) fn spawn_event_pump(
    mut eventloop: rumqttc::EventLoop,
    tx: mpsc::UnboundedSender<ConnEvent>,
    generation: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let end = ev.is_err();
            if tx.send((generation, ev)).is_err() || end {
                break;
            }
        }
    })
}

/// PEM bytes read at start: the CA, and the client certificate and key for mutual TLS.
pub(crate) type TlsBytes = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);

struct Worker {
    cfg: MqttConfig,
    client_id: String,
    prefix: String,
    node_status_topic: String,
    tls: Option<TlsBytes>,
    queue: AlarmQueue,
    iqueue: InspectionQueue,
    /// Each camera's `ready` flag (re-published on reconnect).
    ready: BTreeMap<String, bool>,
    /// Command acknowledgements not yet handed to the connection, oldest first.
    acks: std::collections::VecDeque<Vec<u8>>,
    /// The birth certificate (`<prefix>/info`), once set.
    info: Option<Vec<u8>>,
    shared: Arc<Shared>,
    statuses: BTreeMap<String, CameraStatus>,
    /// Latest acknowledged alarm per camera (re-published on reconnect).
    last_alarm: BTreeMap<String, Alarm>,
    /// Retained messages of cameras and regions (topic → payload), re-published on reconnect.
    retained: BTreeMap<String, Vec<u8>>,
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

    /// `<prefix>/<unit>/<leaf>`, `unit` being `camera` or `camera/region` (each level checked).
    fn topic(&self, camera: &str, leaf: &str) -> Option<String> {
        let levels = camera.split('/').count();
        if (1..=2).contains(&levels) && camera.split('/').all(is_valid_name) {
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
        let mut o = base_options(&self.cfg, &self.client_id, self.tls.as_ref());
        o.set_last_will(LastWill::new(
            self.node_status_topic.clone(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        o.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        o.set_inflight(INFLIGHT);
        o.set_request_channel_capacity(REQUEST_CHANNEL);
        let (client, eventloop) = AsyncClient::new(o, REQUEST_CHANNEL);
        let poll = spawn_event_pump(eventloop, self.ev_tx.clone(), generation);
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
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // This connection subscribes to nothing ([`requests`] does).
                debug!(topic = %p.topic, "mqtt: unexpected message ignored");
            }
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
            .filter(|a| !self.queue.has_camera(&a.unit()))
            .cloned()
            .collect();
        for a in states {
            if let Some(topic) = self.topic(&a.unit(), "alarm") {
                self.publish(
                    topic,
                    QoS::AtLeastOnce,
                    true,
                    a.to_json(true),
                    Sent::AlarmState,
                );
            }
        }
        let retained: Vec<(String, Vec<u8>)> = self
            .retained
            .iter()
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        for (topic, payload) in retained {
            self.publish(topic, QoS::AtLeastOnce, true, payload, Sent::Status);
        }
        let ready: Vec<(String, bool)> = self.ready.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (camera, r) in ready {
            if let Some(topic) = self.topic(&camera, "ready") {
                self.publish(
                    topic,
                    QoS::AtLeastOnce,
                    true,
                    r.to_string().into_bytes(),
                    Sent::Status,
                );
            }
        }
        if let Some(info) = self.info.clone() {
            let topic = format!("{}/info", self.prefix);
            self.publish(topic, QoS::AtLeastOnce, true, info, Sent::Status);
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
        self.iqueue.mark_all_unsent();
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
                        if !self.pending_clear.contains_key(&a.unit()) {
                            self.last_alarm.insert(a.unit(), a);
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
            Sent::Inspection(id) => {
                if let Err(e) = self.iqueue.ack(id) {
                    self.shared.queue_errors.fetch_add(1, Ordering::Relaxed);
                    error!(error = %e, "inspection queue: cannot record acknowledgement (may replay a duplicate after restart)");
                }
                self.shared
                    .queued_inspections
                    .store(self.iqueue.len() as u64, Ordering::Relaxed);
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
            let Some(topic) = self.topic(&alarm.unit(), "alarm") else {
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
        if !self.alarm_blocked {
            self.send_inspections();
        }
        if !self.alarm_blocked {
            self.send_acks();
        }
    }

    /// Queues a command acknowledgement and sends what the connection takes.
    fn push_ack(&mut self, payload: Vec<u8>) {
        if self.acks.len() >= COMMAND_ACKS_MAX {
            self.acks.pop_front();
            warn!("command acknowledgements piling up: the oldest was dropped");
        }
        self.acks.push_back(payload);
        if !self.alarm_blocked {
            self.send_acks();
        }
    }

    /// Sends the queued command acknowledgements (after alarms and inspection results; a full
    /// request channel retries on the alarms' timer).
    fn send_acks(&mut self) {
        if !self.is_up() {
            return;
        }
        let topic = format!("{}/cmd/ack", self.prefix);
        while let Some(payload) = self.acks.front().cloned() {
            if !self.publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload,
                Sent::Status,
            ) {
                self.alarm_blocked = true;
                return;
            }
            self.acks.pop_front();
        }
    }

    /// Sends the queued inspection results not yet handed to this connection, in order (after
    /// the alarms; a full request channel retries on the alarms' timer).
    fn send_inspections(&mut self) {
        if !self.is_up() {
            return;
        }
        let pending: Vec<(u64, Inspection, bool)> = self
            .iqueue
            .entries
            .iter()
            .filter(|e| !e.sent)
            .map(|e| (e.id, e.alarm.clone(), e.replay))
            .collect();
        for (id, insp, replay) in pending {
            let Some(topic) = self.topic(&insp.camera, "inspection") else {
                let _ = self.iqueue.ack(id);
                continue;
            };
            if self.publish(
                topic,
                QoS::AtLeastOnce,
                false,
                insp.to_json(replay),
                Sent::Inspection(id),
            ) {
                if let Some(e) = self.iqueue.entries.iter_mut().find(|e| e.id == id) {
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
            let calibration = self.topic(&camera, "calibration");
            let handed = self.publish(status, QoS::AtLeastOnce, true, Vec::new(), Sent::Status)
                && calibration.is_none_or(|t| {
                    self.publish(t, QoS::AtLeastOnce, true, Vec::new(), Sent::Status)
                })
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
                self.pending_clear.remove(&a.unit());
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
            Ctl::Inspection(i) => {
                let replay = !self.is_up();
                let (_, out) = self.iqueue.push(*i, replay);
                if let Some(dropped) = out.dropped {
                    self.shared
                        .dropped_inspections
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(camera = %dropped.camera, meas_id = %dropped.meas_id, "inspection queue full: oldest result dropped");
                }
                if let Some(e) = out.io_error {
                    self.shared.queue_errors.fetch_add(1, Ordering::Relaxed);
                    error!(error = %e, "inspection queue write failed: result kept in memory only");
                }
                self.shared
                    .queued_inspections
                    .store(self.iqueue.len() as u64, Ordering::Relaxed);
                if !self.alarm_blocked {
                    self.send_inspections();
                }
            }
            Ctl::Ready(camera, r) => {
                // A `false` computed for a camera a reload just removed (the trigger stage learns
                // of the removal after the cameras do) must not re-create its cleared topic; a
                // `true` means the camera is back.
                let late_false = !r && self.pending_clear.contains_key(&camera);
                if r {
                    self.pending_clear.remove(&camera);
                }
                if !late_false
                    && self.ready.get(&camera) != Some(&r)
                    && let Some(topic) = self.topic(&camera, "ready")
                {
                    self.ready.insert(camera, r);
                    self.publish(
                        topic,
                        QoS::AtLeastOnce,
                        true,
                        r.to_string().into_bytes(),
                        Sent::Status,
                    );
                }
            }
            Ctl::Info(payload) => {
                if self.info.as_ref() != Some(&payload) {
                    let topic = format!("{}/info", self.prefix);
                    self.info = Some(payload.clone());
                    self.publish(topic, QoS::AtLeastOnce, true, payload, Sent::Status);
                }
            }
            Ctl::CommandAck(payload) => self.push_ack(payload),
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
            Ctl::Retained(unit, leaf, payload) => {
                self.pending_clear.remove(&unit);
                if let Some(topic) = self.topic(&unit, leaf) {
                    if self.retained.get(&topic) == Some(&payload) {
                        return;
                    }
                    self.retained.insert(topic.clone(), payload.clone());
                    self.publish(topic, QoS::AtLeastOnce, true, payload, Sent::Status);
                }
            }
            Ctl::Forget(camera) => {
                if self.ready.remove(&camera).is_some()
                    && let Some(topic) = self.topic(&camera, "ready")
                {
                    self.publish(topic, QoS::AtLeastOnce, true, Vec::new(), Sent::Status);
                }
                self.statuses.remove(&camera);
                let sub = format!("{camera}/");
                self.last_alarm
                    .retain(|k, _| *k != camera && !k.starts_with(&sub));
                if let Some(t) = self.topic(&camera, "") {
                    self.retained.retain(|k, _| !k.starts_with(&t));
                }
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
                let unit = match &r.region {
                    Some(region) => format!("{}/{region}", r.camera),
                    None => r.camera.clone(),
                };
                let ok = match self.topic(&unit, "result") {
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
            let ready: Vec<String> = self.ready.keys().cloned().collect();
            for camera in ready {
                self.ready.insert(camera.clone(), false);
                if let Some(topic) = self.topic(&camera, "ready") {
                    self.publish(
                        topic,
                        QoS::AtLeastOnce,
                        true,
                        b"false".to_vec(),
                        Sent::Status,
                    );
                }
            }
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
        if stop.stopped_acked && self.queue.is_empty() && self.iqueue.is_empty() && flushed {
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
