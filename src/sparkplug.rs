//! The optional Sparkplug B edge node (`[sparkplug]`): the daemon as a Sparkplug B edge node
//! (`spBv1.0/<group_id>/…/<edge_node_id>`), each camera a device, on its own MQTT connection.
//!
//! Input: from the inference worker, each scored frame's region decisions ([`Sparkplug::frame`]:
//! verdict, score, threshold, alarm state); from the camera stage, each status change
//! ([`Sparkplug::status`]); from the daemon, the set of cameras and regions at start and after
//! each reload ([`Sparkplug::devices`]); from the broker, NCMD messages. All calls only write
//! the latest values under a short lock and wake the node task: the worker never waits for the
//! broker.
//!
//! Output (payloads encoded with code generated from the official `sparkplug_b.proto`,
//! [`proto`]): NBIRTH (`bdSeq` Int64, `Node Control/Rebirth` Boolean, `Properties/Version`,
//! `Properties/Model`), one DBIRTH per camera (`status` String, and per region `<region>/verdict`
//! String, `<region>/score` Float, `<region>/alarm` Boolean, `<region>/threshold` Float; the
//! implicit whole-frame region is named [`FRAME_REGION`]), each metric with name, alias and
//! datatype; DDATA with the changed metrics only, by alias; DDEATH when a camera is removed by a
//! reload or stops for good (an error it does not retry); NDEATH with `bdSeq`, registered as the
//! MQTT Will (QoS 1, not retained) and also published before a clean disconnect. `seq` runs
//! 0..=255 over NBIRTH (always 0), DBIRTH, NDATA, DDATA and DDEATH. All births are QoS 0, not
//! retained, as the specification requires. Topics and metrics: `docs/sparkplug.md`.
//!
//! `bdSeq`: kept in `<state_dir>/sparkplug-bdseq` (written atomically before each connection
//! attempt, [`crate::statedir::replace_file`]); each connection that the broker accepted is
//! followed by the next number (mod 256), so the NDEATH a host receives after a crash, a kill or
//! a clean stop carries the `bdSeq` of that connection's NBIRTH, and the next process starts
//! from the number after it.
//!
//! Rebirth: an NCMD `Node Control/Rebirth = true` (by name or by its alias) re-publishes NBIRTH
//! (same `bdSeq`: the Will of the connection is unchanged; `seq` 0) and every DBIRTH.
//!
//! Commands (only with `[commands]`, [`Sparkplug::set_commands`]; translated into the same
//! [`crate::commands::Command`]s as `<prefix>/cmd`, acknowledged on `<prefix>/cmd/ack` with
//! `source: "sparkplug"`): a DCMD writing `<region>/threshold` (Float) sets that region's T2
//! (`set_thresholds`, the T1 in force kept while it is at most the new T2); writing
//! `<region>/alarm` = false acknowledges its alarm (`ack_alarm`); writing `Device
//! Control/Disable` = true disables the camera (`disable_camera`; the device dies). An NCMD
//! writing `Node Control/Enable Camera` = "<camera>" enables one again. Other metrics, wrong
//! datatypes and commands while `[commands]` is off are logged and ignored.
//!
//! Failure modes: broker unreachable → reconnect with `[mqtt]`'s capped backoff, then a new
//! `bdSeq` and births; a state-directory write failure is logged (the connection goes on with the
//! number in memory); a malformed, oversized (> [`MAX_NCMD_BYTES`]), retained or misaddressed
//! command is logged (the first of each kind at warn, the next ones at debug) and ignored.
//! Historical data is not buffered: values scored while disconnected are not sent later (the
//! births after the reconnect carry the latest ones). Nothing here panics on input.

pub mod config;
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, Outgoing, Packet, QoS};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use crate::mqtt::ConnEvent;
use crate::mqtt::config::MqttConfig;
use crate::mqtt::{Backoff, PublisherError, TlsBytes, base_options, read_tls};
use proto::payload::{Metric, metric};

pub use config::SparkplugConfig;

/// The Sparkplug B topic namespace.
pub const NAMESPACE: &str = "spBv1.0";
/// The file holding the `bdSeq` of the last connection attempt.
pub const BDSEQ_FILE: &str = "sparkplug-bdseq";
/// The metric name of the implicit whole-frame region (as in `docs/metrics.md`).
pub const FRAME_REGION: &str = "(frame)";
/// Largest NCMD/DCMD payload decoded; larger ones are ignored.
pub const MAX_NCMD_BYTES: usize = 64 * 1024;
/// The rebirth request metric.
pub const REBIRTH: &str = "Node Control/Rebirth";
/// The NCMD metric that enables a camera a command disabled (String: the camera's name).
pub const ENABLE_CAMERA: &str = "Node Control/Enable Camera";
/// The DCMD metric that disables the device's camera (Boolean true).
pub const DISABLE: &str = "Device Control/Disable";

/// Sparkplug B datatypes used here (`DataType` of the schema).
pub mod datatype {
    pub const INT64: u32 = 4;
    pub const FLOAT: u32 = 9;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
}

const REQUEST_CHANNEL: usize = 256;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SparkplugError {
    #[error("{0}")]
    Mqtt(#[from] PublisherError),
}

/// One region's decision on one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionReport {
    /// The region's name; `None` for the implicit whole-frame region.
    pub region: Option<String>,
    /// `OK`, `UNKNOWN` or `NG`.
    pub verdict: &'static str,
    /// NaN when not scored (the region did not fit the frame).
    pub score: f32,
    pub threshold: Option<f32>,
    /// The region's debounced alarm state after this frame.
    pub alarm: bool,
}

/// One camera as a device: its name and its regions' metric names (`None`: the implicit one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub regions: Vec<Option<String>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null(u32),
    Str(String),
    F32(f32),
    Bool(bool),
    I64(i64),
}

impl Value {
    fn datatype(&self) -> u32 {
        match self {
            Value::Null(t) => *t,
            Value::Str(_) => datatype::STRING,
            Value::F32(_) => datatype::FLOAT,
            Value::Bool(_) => datatype::BOOLEAN,
            Value::I64(_) => datatype::INT64,
        }
    }

    fn float(x: Option<f32>) -> Value {
        match x {
            Some(x) if x.is_finite() => Value::F32(x),
            _ => Value::Null(datatype::FLOAT),
        }
    }

    fn metric(&self, name: Option<&str>, alias: Option<u64>, ts: u64, with_type: bool) -> Metric {
        let mut m = Metric {
            name: name.map(str::to_owned),
            alias,
            timestamp: Some(ts),
            datatype: with_type.then(|| self.datatype()),
            ..Default::default()
        };
        match self {
            Value::Null(_) => m.is_null = Some(true),
            Value::Str(s) => m.value = Some(metric::Value::StringValue(s.clone())),
            Value::F32(x) => m.value = Some(metric::Value::FloatValue(*x)),
            Value::Bool(b) => m.value = Some(metric::Value::BooleanValue(*b)),
            Value::I64(i) => m.value = Some(metric::Value::LongValue(*i as u64)),
        }
        m
    }
}

/// A device's metric names in birth order.
fn device_metrics(spec: &DeviceSpec) -> Vec<String> {
    let mut names = vec!["status".to_owned(), DISABLE.to_owned()];
    for r in &spec.regions {
        let r = r.as_deref().unwrap_or(FRAME_REGION);
        for leaf in ["verdict", "score", "alarm", "threshold"] {
            names.push(format!("{r}/{leaf}"));
        }
    }
    names
}

fn default_value(metric: &str) -> Value {
    match metric.rsplit('/').next() {
        Some("score") | Some("threshold") => Value::Null(datatype::FLOAT),
        Some("alarm") => Value::Null(datatype::BOOLEAN),
        _ if metric == DISABLE => Value::Bool(false),
        Some("status") if metric == "status" => Value::Str("starting".into()),
        _ => Value::Null(datatype::STRING),
    }
}

/// What the daemon last reported (written by the handle, read by the task).
#[derive(Default)]
struct Latest {
    devices: Vec<DeviceSpec>,
    /// Camera → metric → value.
    values: BTreeMap<String, BTreeMap<String, Value>>,
    /// Cameras stopped for good (error not retried).
    dead: BTreeSet<String>,
    /// Cameras whose values changed since the task last looked.
    dirty: BTreeSet<String>,
    layout_changed: bool,
    stop: Option<Duration>,
}

struct Inner {
    latest: Mutex<Latest>,
    wake: Notify,
    /// Where commands go (`[commands]`); `None`: DCMD and command NCMDs are ignored.
    commands: Mutex<Option<mpsc::Sender<crate::commands::Request>>>,
}

/// The handle the daemon's stages report through (Clone + Send + Sync, never blocks).
#[derive(Clone)]
pub struct Sparkplug {
    inner: Arc<Inner>,
}

fn lock(m: &Mutex<Latest>) -> std::sync::MutexGuard<'_, Latest> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sparkplug {
    /// Spawns the node task on the current tokio runtime (the first connection attempt is
    /// immediate; a broker that is down is not an error). `model`: `Properties/Model`.
    pub fn spawn(
        spb: &SparkplugConfig,
        mqtt: &MqttConfig,
        node_id: &str,
        state_dir: &Path,
        model: &str,
    ) -> Result<(Sparkplug, JoinHandle<()>), SparkplugError> {
        let tls = read_tls(mqtt)?;
        let handle = Sparkplug {
            inner: Arc::new(Inner {
                latest: Mutex::new(Latest::default()),
                wake: Notify::new(),
                commands: Mutex::new(None),
            }),
        };
        let bdseq_path = state_dir.join(BDSEQ_FILE);
        let last = read_bdseq(&bdseq_path);
        let topic =
            |kind: &str| format!("{NAMESPACE}/{}/{kind}/{}", spb.group_id, spb.edge_node_id);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let node = Node {
            cfg: spb.clone(),
            mqtt: mqtt.clone(),
            client_id: format!("{}-spb", mqtt.client_id_for(node_id)),
            tls,
            model: model.to_owned(),
            bdseq_path,
            bdseq: last.map_or(0, |b| (b + 1) % 256),
            ncmd_topic: topic("NCMD"),
            nbirth_topic: topic("NBIRTH"),
            ndeath_topic: topic("NDEATH"),
            inner: handle.inner.clone(),
            conn: None,
            generation: 0,
            backoff: Backoff::new(mqtt.reconnect_min, mqtt.reconnect_max),
            next_attempt: Instant::now(),
            seq: 0,
            next_alias: 1,
            born: BTreeMap::new(),
            logged: BTreeSet::new(),
            ev_tx,
            ev_rx,
            stopping: None,
        };
        let task = tokio::spawn(node.run());
        Ok((handle, task))
    }

    /// The cameras and their regions (at start and after each reload).
    pub fn devices(&self, devices: Vec<DeviceSpec>) {
        let mut l = lock(&self.inner.latest);
        if l.devices != devices {
            let names: BTreeSet<&str> = devices.iter().map(|d| d.name.as_str()).collect();
            l.values.retain(|k, _| names.contains(k.as_str()));
            l.dead.retain(|k| names.contains(k.as_str()));
            l.devices = devices;
            l.layout_changed = true;
        }
        drop(l);
        self.inner.wake.notify_one();
    }

    /// A camera's status (`online`, `reconnecting`, `error: …`); `dead`: it stopped for good.
    pub fn status(&self, camera: &str, status: &str, dead: bool) {
        let mut l = lock(&self.inner.latest);
        l.values
            .entry(camera.to_owned())
            .or_default()
            .insert("status".into(), Value::Str(status.to_owned()));
        let was_dead = l.dead.contains(camera);
        if dead != was_dead {
            if dead {
                l.dead.insert(camera.to_owned());
            } else {
                l.dead.remove(camera);
            }
        }
        l.dirty.insert(camera.to_owned());
        drop(l);
        self.inner.wake.notify_one();
    }

    /// One scored frame's decisions of `camera` (at most one DDATA follows per call).
    pub fn frame(&self, camera: &str, regions: &[RegionReport]) {
        let mut l = lock(&self.inner.latest);
        let values = l.values.entry(camera.to_owned()).or_default();
        for r in regions {
            let name = r.region.as_deref().unwrap_or(FRAME_REGION);
            values.insert(format!("{name}/verdict"), Value::Str(r.verdict.to_owned()));
            values.insert(format!("{name}/score"), Value::float(Some(r.score)));
            values.insert(format!("{name}/alarm"), Value::Bool(r.alarm));
            values.insert(format!("{name}/threshold"), Value::float(r.threshold));
        }
        l.dirty.insert(camera.to_owned());
        drop(l);
        self.inner.wake.notify_one();
    }

    /// Takes commands from now on (`[commands]`): DCMD writes and `Node Control/Enable Camera`
    /// become requests on `tx`.
    pub fn set_commands(&self, tx: mpsc::Sender<crate::commands::Request>) {
        *self
            .inner
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }

    /// Publishes NDEATH and disconnects within `deadline` (the task then ends).
    pub fn shutdown(&self, deadline: Duration) {
        lock(&self.inner.latest).stop = Some(deadline);
        self.inner.wake.notify_one();
    }
}

/// The last `bdSeq` used, if the file holds one.
fn read_bdseq(path: &Path) -> Option<u64> {
    match crate::statedir::read_file(path) {
        Ok(Some(bytes)) => {
            let n = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|n| *n < 256);
            if n.is_none() {
                warn!(path = %path.display(), "sparkplug: unreadable bdSeq file; starting from 0");
            }
            n
        }
        Ok(None) => None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "sparkplug: cannot read the bdSeq file; starting from 0");
            None
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Conn {
    generation: u64,
    client: AsyncClient,
    _poll: AbortOnDrop,
    up: bool,
    /// Whether the broker accepted this connection (its bdSeq is used up).
    accepted: bool,
}

/// A device as born on the current connection: its aliases and the values last sent.
struct Born {
    spec: DeviceSpec,
    aliases: BTreeMap<String, u64>,
    sent: BTreeMap<String, Value>,
    last_data: Option<Instant>,
}

struct Stopping {
    deadline: Instant,
    ndeath_sent: bool,
    done: bool,
}

struct Node {
    cfg: SparkplugConfig,
    mqtt: MqttConfig,
    client_id: String,
    tls: Option<TlsBytes>,
    model: String,
    bdseq_path: PathBuf,
    /// The bdSeq of the current (or next) connection.
    bdseq: u64,
    ncmd_topic: String,
    nbirth_topic: String,
    ndeath_topic: String,
    inner: Arc<Inner>,
    conn: Option<Conn>,
    generation: u64,
    backoff: Backoff,
    next_attempt: Instant,
    seq: u64,
    next_alias: u64,
    born: BTreeMap<String, Born>,
    /// Kinds of bad input already logged at warn.
    logged: BTreeSet<&'static str>,
    ev_tx: mpsc::UnboundedSender<ConnEvent>,
    ev_rx: mpsc::UnboundedReceiver<ConnEvent>,
    stopping: Option<Stopping>,
}

impl Node {
    async fn run(mut self) {
        info!(group = %self.cfg.group_id, edge_node = %self.cfg.edge_node_id, "sparkplug edge node started");
        let inner = self.inner.clone();
        loop {
            if self.stopping.as_ref().is_some_and(|s| s.done) {
                break;
            }
            let far = Instant::now() + Duration::from_secs(86_400);
            let connect_at =
                (self.conn.is_none() && self.stopping.is_none()).then_some(self.next_attempt);
            let deadline = self.stopping.as_ref().map(|s| s.deadline);
            let data_at = self.next_data_at();
            tokio::select! {
                biased;
                Some((generation, ev)) = self.ev_rx.recv() => self.on_event(generation, ev),
                _ = inner.wake.notified() => self.on_wake(),
                _ = sleep_until(data_at.unwrap_or(far)), if data_at.is_some() => self.send_data(),
                _ = sleep_until(connect_at.unwrap_or(far)), if connect_at.is_some() => self.connect(),
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    warn!("sparkplug: stop deadline reached before NDEATH was acknowledged");
                    break;
                }
            }
        }
        self.conn = None;
        info!("sparkplug edge node stopped");
    }

    /// When a rate-limited device's pending changes may go (never while stopping: `send_data`
    /// sends nothing then, and a deadline in the past would wake the loop again at once).
    fn next_data_at(&self) -> Option<Instant> {
        if self.cfg.data_interval.is_zero() || !self.is_up() || self.stopping.is_some() {
            return None;
        }
        let l = lock(&self.inner.latest);
        self.born
            .iter()
            .filter(|(name, _)| l.dirty.contains(*name))
            .filter_map(|(_, b)| b.last_data.map(|t| t + self.cfg.data_interval))
            .min()
    }

    fn is_up(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.up)
    }

    fn topic(&self, kind: &str, device: &str) -> String {
        format!(
            "{NAMESPACE}/{}/{kind}/{}/{device}",
            self.cfg.group_id, self.cfg.edge_node_id
        )
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq = (self.seq + 1) % 256;
        s
    }

    fn bdseq_metric(&self, alias: bool) -> Metric {
        Value::I64(self.bdseq as i64).metric(Some("bdSeq"), alias.then_some(1), now_ms(), true)
    }

    fn ndeath(&self) -> Vec<u8> {
        proto::Payload {
            timestamp: Some(now_ms()),
            metrics: vec![self.bdseq_metric(false)],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn connect(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        // The number is used up only by a connection the broker accepted; it is on disk before
        // the Will carrying it is registered.
        if let Err(e) =
            crate::statedir::replace_file(&self.bdseq_path, format!("{}\n", self.bdseq).as_bytes())
        {
            warn!(path = %self.bdseq_path.display(), error = %e, "sparkplug: cannot persist bdSeq");
        }
        let mut o = base_options(&self.mqtt, &self.client_id, self.tls.as_ref());
        o.set_last_will(LastWill::new(
            self.ndeath_topic.clone(),
            self.ndeath(),
            QoS::AtLeastOnce,
            false,
        ));
        o.set_max_packet_size(crate::mqtt::MAX_PACKET_BYTES, crate::mqtt::MAX_PACKET_BYTES);
        o.set_request_channel_capacity(REQUEST_CHANNEL);
        let (client, eventloop) = AsyncClient::new(o, REQUEST_CHANNEL);
        let poll = crate::mqtt::spawn_event_pump(eventloop, self.ev_tx.clone(), generation);
        debug!(generation, bdseq = self.bdseq, "sparkplug: connecting");
        self.conn = Some(Conn {
            generation,
            client,
            _poll: AbortOnDrop(poll),
            up: false,
            accepted: false,
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
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                conn.up = true;
                conn.accepted = true;
                let client = conn.client.clone();
                self.backoff.reset();
                info!(bdseq = self.bdseq, host = %self.mqtt.host, "sparkplug: connected");
                // Subscribed before NBIRTH (requests are written in order).
                if let Err(e) = client.try_subscribe(self.ncmd_topic.clone(), QoS::AtLeastOnce) {
                    warn!(error = %e, "sparkplug: cannot subscribe to NCMD");
                }
                let dcmd = format!(
                    "{NAMESPACE}/{}/DCMD/{}/+",
                    self.cfg.group_id, self.cfg.edge_node_id
                );
                if let Err(e) = client.try_subscribe(dcmd, QoS::AtLeastOnce) {
                    warn!(error = %e, "sparkplug: cannot subscribe to DCMD");
                }
                if self.stopping.is_none() {
                    self.rebirth();
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                self.on_command(&p.topic, &p.payload, p.retain)
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                if let Some(s) = &mut self.stopping
                    && s.ndeath_sent
                    && let Some(c) = &self.conn
                {
                    let _ = c.client.try_disconnect();
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if let Some(s) = &mut self.stopping {
                    s.done = true;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let conn = self.conn.take();
                if let Some(s) = &mut self.stopping {
                    s.done = true;
                    return;
                }
                match conn {
                    Some(c) if c.accepted => {
                        warn!(error = %e, "sparkplug: connection lost; reconnecting with a new bdSeq");
                        self.bdseq = (self.bdseq + 1) % 256;
                    }
                    _ => debug!(error = %e, "sparkplug: connect attempt failed"),
                }
                self.born.clear();
                self.next_attempt = Instant::now() + self.backoff.next();
            }
        }
    }

    fn on_wake(&mut self) {
        let stop = lock(&self.inner.latest).stop;
        if let Some(d) = stop
            && self.stopping.is_none()
        {
            self.begin_stop(d);
            return;
        }
        if self.stopping.is_some() || !self.is_up() {
            return;
        }
        self.sync_devices();
        self.send_data();
    }

    fn begin_stop(&mut self, d: Duration) {
        let mut s = Stopping {
            deadline: Instant::now() + d,
            ndeath_sent: false,
            done: false,
        };
        match &self.conn {
            Some(c) if c.up => {
                // A clean stop publishes the NDEATH itself (QoS 1), then disconnects once the
                // broker has it.
                if c.client
                    .try_publish(
                        self.ndeath_topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        self.ndeath(),
                    )
                    .is_ok()
                {
                    s.ndeath_sent = true;
                } else {
                    let _ = c.client.try_disconnect();
                }
            }
            _ => s.done = true,
        }
        self.stopping = Some(s);
    }

    /// NBIRTH (seq 0) and a DBIRTH for every live camera, aliases assigned anew.
    fn rebirth(&mut self) {
        if !self.is_up() {
            return;
        }
        self.seq = 0;
        self.next_alias = 6;
        self.born.clear();
        let ts = now_ms();
        let seq = self.next_seq();
        let nbirth = proto::Payload {
            timestamp: Some(ts),
            seq: Some(seq),
            metrics: vec![
                self.bdseq_metric(true),
                Value::Bool(false).metric(Some(REBIRTH), Some(2), ts, true),
                Value::Str(env!("CARGO_PKG_VERSION").into()).metric(
                    Some("Properties/Version"),
                    Some(3),
                    ts,
                    true,
                ),
                Value::Str(self.model.clone()).metric(Some("Properties/Model"), Some(4), ts, true),
                Value::Str(String::new()).metric(Some(ENABLE_CAMERA), Some(5), ts, true),
            ],
            ..Default::default()
        };
        if !self.publish(self.nbirth_topic.clone(), nbirth) {
            warn!("sparkplug: NBIRTH not accepted");
        }
        info!(bdseq = self.bdseq, "sparkplug: NBIRTH");
        let inner = self.inner.clone();
        let mut l = lock(&inner.latest);
        l.layout_changed = false;
        let specs: Vec<DeviceSpec> = l
            .devices
            .iter()
            .filter(|d| !l.dead.contains(&d.name))
            .cloned()
            .collect();
        for spec in specs {
            l.dirty.remove(&spec.name);
            let values = l.values.get(&spec.name).cloned().unwrap_or_default();
            self.dbirth(spec, &values);
        }
    }

    fn dbirth(&mut self, spec: DeviceSpec, values: &BTreeMap<String, Value>) {
        let ts = now_ms();
        let mut aliases = BTreeMap::new();
        let mut sent = BTreeMap::new();
        let mut metrics = Vec::new();
        for name in device_metrics(&spec) {
            let alias = self.next_alias;
            self.next_alias += 1;
            let v = values
                .get(&name)
                .cloned()
                .unwrap_or_else(|| default_value(&name));
            metrics.push(v.metric(Some(&name), Some(alias), ts, true));
            aliases.insert(name.clone(), alias);
            sent.insert(name, v);
        }
        let seq = self.next_seq();
        let payload = proto::Payload {
            timestamp: Some(ts),
            seq: Some(seq),
            metrics,
            ..Default::default()
        };
        self.publish(self.topic("DBIRTH", &spec.name), payload);
        self.born.insert(
            spec.name.clone(),
            Born {
                spec,
                aliases,
                sent,
                last_data: None,
            },
        );
    }

    fn ddeath(&mut self, device: &str) {
        if self.born.remove(device).is_none() {
            return;
        }
        let seq = self.next_seq();
        let payload = proto::Payload {
            timestamp: Some(now_ms()),
            seq: Some(seq),
            ..Default::default()
        };
        info!(device, "sparkplug: DDEATH");
        self.publish(self.topic("DDEATH", device), payload);
    }

    fn publish(&self, topic: String, payload: proto::Payload) -> bool {
        let Some(conn) = self.conn.as_ref().filter(|c| c.up) else {
            return false;
        };
        match conn
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload.encode_to_vec())
        {
            Ok(()) => true,
            Err(e) => {
                debug!(error = %e, "sparkplug: publish not accepted");
                false
            }
        }
    }

    /// Births and deaths for cameras added, removed, changed, stopped or back.
    fn sync_devices(&mut self) {
        let (specs, dead, changed) = {
            let mut l = lock(&self.inner.latest);
            let changed = std::mem::take(&mut l.layout_changed);
            (l.devices.clone(), l.dead.clone(), changed)
        };
        let wanted: BTreeMap<&str, &DeviceSpec> = specs
            .iter()
            .filter(|d| !dead.contains(&d.name))
            .map(|d| (d.name.as_str(), d))
            .collect();
        let gone: Vec<String> = self
            .born
            .iter()
            .filter(|(n, b)| {
                wanted
                    .get(n.as_str())
                    .is_none_or(|s| changed && **s != b.spec)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.ddeath(&n);
        }
        for (name, spec) in wanted {
            if !self.born.contains_key(name) {
                let values = {
                    let mut l = lock(&self.inner.latest);
                    l.dirty.remove(name);
                    l.values.get(name).cloned().unwrap_or_default()
                };
                self.dbirth(spec.clone(), &values);
            }
        }
    }

    /// DDATA for each born camera with changed values (by alias, changed metrics only).
    fn send_data(&mut self) {
        if !self.is_up() || self.stopping.is_some() {
            return;
        }
        let now = Instant::now();
        let interval = self.cfg.data_interval;
        let due: Vec<(String, BTreeMap<String, Value>)> = {
            let mut l = lock(&self.inner.latest);
            let names: Vec<String> = l
                .dirty
                .iter()
                .filter(|n| {
                    self.born.get(*n).is_some_and(|b| {
                        interval.is_zero() || b.last_data.is_none_or(|t| now >= t + interval)
                    })
                })
                .cloned()
                .collect();
            names
                .into_iter()
                .map(|n| {
                    l.dirty.remove(&n);
                    let v = l.values.get(&n).cloned().unwrap_or_default();
                    (n, v)
                })
                .collect()
        };
        let ts = now_ms();
        for (name, values) in due {
            let Some(b) = self.born.get(&name) else {
                continue;
            };
            let metrics: Vec<(String, Metric)> = values
                .iter()
                .filter(|(k, v)| b.sent.get(*k) != Some(*v))
                .filter_map(|(k, v)| {
                    let alias = *b.aliases.get(k)?;
                    Some((k.clone(), v.metric(None, Some(alias), ts, false)))
                })
                .collect();
            if metrics.is_empty() {
                continue;
            }
            let seq = self.next_seq();
            let payload = proto::Payload {
                timestamp: Some(ts),
                seq: Some(seq),
                metrics: metrics.iter().map(|(_, m)| m.clone()).collect(),
                ..Default::default()
            };
            let ok = self.publish(self.topic("DDATA", &name), payload);
            if let Some(b) = self.born.get_mut(&name) {
                b.last_data = Some(now);
                if ok {
                    for (k, _) in metrics {
                        if let Some(v) = values.get(&k) {
                            b.sent.insert(k, v.clone());
                        }
                    }
                }
            }
        }
    }

    /// Logs bad input: the first of each kind at warn, later ones at debug.
    fn ignored(&mut self, kind: &'static str, topic: &str, why: &str) {
        if self.logged.insert(kind) {
            warn!(
                topic,
                kind, "sparkplug: command ignored: {why} (further ones are logged at debug)"
            );
        } else {
            debug!(topic, kind, "sparkplug: command ignored: {why}");
        }
    }

    fn on_command(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let dcmd_prefix = format!(
            "{NAMESPACE}/{}/DCMD/{}/",
            self.cfg.group_id, self.cfg.edge_node_id
        );
        let device = topic
            .strip_prefix(dcmd_prefix.as_str())
            .filter(|d| !d.contains('/'));
        if topic != self.ncmd_topic && device.is_none() {
            self.ignored("other", topic, "not this node's NCMD or DCMD topic");
            return;
        }
        if retain {
            self.ignored(
                "retained",
                topic,
                "a retained command (stale) is not acted on",
            );
            return;
        }
        if payload.len() > MAX_NCMD_BYTES {
            self.ignored("oversized", topic, "payload larger than 64 KiB");
            return;
        }
        let p = match proto::Payload::decode(payload) {
            Ok(p) => p,
            Err(_) => {
                self.ignored("malformed", topic, "not a Sparkplug B payload");
                return;
            }
        };
        if let Some(device) = device {
            self.on_dcmd(topic, device, &p);
            return;
        }
        let mut rebirth = false;
        for m in &p.metrics {
            let is_rebirth =
                m.name.as_deref() == Some(REBIRTH) || (m.name.is_none() && m.alias == Some(2));
            let is_enable = m.name.as_deref() == Some(ENABLE_CAMERA)
                || (m.name.is_none() && m.alias == Some(5));
            if is_rebirth {
                match m.value {
                    Some(metric::Value::BooleanValue(true)) => rebirth = true,
                    _ => self.ignored(
                        "rebirth-value",
                        topic,
                        "Node Control/Rebirth without the value true",
                    ),
                }
            } else if is_enable {
                match &m.value {
                    Some(metric::Value::StringValue(camera)) => {
                        self.command(
                            topic,
                            crate::commands::Command::SetEnabled {
                                camera: camera.clone(),
                                enabled: true,
                            },
                        );
                    }
                    _ => self.ignored(
                        "enable-value",
                        topic,
                        "Node Control/Enable Camera without a String value",
                    ),
                }
            } else {
                self.ignored("unknown-metric", topic, "no such node command");
            }
        }
        if rebirth {
            info!("sparkplug: rebirth requested");
            self.rebirth();
        }
    }
}

impl Node {
    /// Hands a command to the daemon (which acknowledges it on `<prefix>/cmd/ack`).
    fn command(&mut self, topic: &str, command: crate::commands::Command) {
        let tx = self
            .inner
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(tx) = tx else {
            self.ignored(
                "commands-off",
                topic,
                "commands are off ([commands] is not set)",
            );
            return;
        };
        info!(topic, cmd = command.name(), "sparkplug: command");
        let req = crate::commands::Request { id: None, command };
        if tx.try_send(req).is_err() {
            self.ignored("commands-full", topic, "too many commands waiting");
        }
    }

    /// A DCMD for `device` (a camera): metrics by name, or by the alias of its DBIRTH.
    fn on_dcmd(&mut self, topic: &str, device: &str, p: &proto::Payload) {
        use crate::commands::Command;
        let Some(born) = self.born.get(device) else {
            self.ignored("unknown-device", topic, "no such device (not born)");
            return;
        };
        let names: Vec<Option<String>> = p
            .metrics
            .iter()
            .map(|m| {
                m.name.clone().or_else(|| {
                    m.alias.and_then(|a| {
                        born.aliases
                            .iter()
                            .find(|(_, v)| **v == a)
                            .map(|(k, _)| k.clone())
                    })
                })
            })
            .collect();
        for (m, name) in p.metrics.iter().zip(names) {
            let Some(name) = name else {
                self.ignored("unknown-metric", topic, "no such device metric");
                continue;
            };
            let (region, leaf) = match name.rsplit_once('/') {
                Some((r, l)) => (r, l),
                None => ("", name.as_str()),
            };
            let region = (region != FRAME_REGION).then(|| region.to_owned());
            let command = match (name.as_str(), leaf, &m.value) {
                (DISABLE, _, Some(metric::Value::BooleanValue(true))) => Command::SetEnabled {
                    camera: device.to_owned(),
                    enabled: false,
                },
                (_, "threshold", Some(metric::Value::FloatValue(t2))) if name != DISABLE => {
                    if !(t2.is_finite() && (0.0..=1.0).contains(t2)) {
                        self.ignored("threshold-value", topic, "threshold outside [0, 1]");
                        continue;
                    }
                    Command::SetThresholds {
                        camera: device.to_owned(),
                        region,
                        t2: *t2,
                        t1: None,
                        keep_t1: true,
                    }
                }
                (_, "alarm", Some(metric::Value::BooleanValue(false))) => Command::AckAlarm {
                    camera: device.to_owned(),
                    region,
                },
                _ => {
                    self.ignored(
                        "dcmd-metric",
                        topic,
                        "writable: <region>/threshold (Float), <region>/alarm = false, Device Control/Disable = true",
                    );
                    continue;
                }
            };
            self.command(topic, command);
        }
    }
}

/// The device specs of a config's cameras.
pub fn device_specs(cameras: &[crate::config::CameraConfig]) -> Vec<DeviceSpec> {
    cameras
        .iter()
        .map(|c| DeviceSpec {
            name: c.name.clone(),
            regions: c.regions.iter().map(|r| r.name.clone()).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_metric_names() {
        let spec = DeviceSpec {
            name: "cam".into(),
            regions: vec![None, Some("left".into())],
        };
        let names = device_metrics(&spec);
        assert_eq!(names[0], "status");
        assert_eq!(names[1], DISABLE);
        assert_eq!(names[2], "(frame)/verdict");
        assert_eq!(names[9], "left/threshold");
        assert_eq!(names.len(), 10);
    }

    #[test]
    fn values_encode_with_their_datatypes() {
        let m = Value::F32(0.5).metric(Some("a/score"), Some(7), 1, true);
        let bytes = proto::Payload {
            metrics: vec![m],
            ..Default::default()
        }
        .encode_to_vec();
        let back = proto::Payload::decode(&bytes[..]).expect("decode");
        assert_eq!(back.metrics[0].datatype, Some(datatype::FLOAT));
        assert_eq!(back.metrics[0].value, Some(metric::Value::FloatValue(0.5)));
        assert_eq!(Value::float(Some(f32::NAN)), Value::Null(datatype::FLOAT));
        let null = Value::Null(datatype::BOOLEAN).metric(None, Some(3), 1, false);
        assert_eq!(null.is_null, Some(true));
        assert_eq!(null.datatype, None);
    }
}
