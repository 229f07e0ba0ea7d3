//! A real MQTT broker and a PLC-like subscriber for the integration tests.
//!
//! [`Broker`] runs mosquitto on a free 127.0.0.1 port (persistence off, so a restart loses
//! retained messages as a broker without persistence would) and SIGKILLs it by PID on drop.
//! [`Watcher`] is a separate MQTT client subscribed as a PLC would be; it re-subscribes after
//! every reconnect. [`Proxy`] is a TCP proxy with a gate, so a test decides when a client may
//! reach a restarted broker again. Every wait is bounded ([`WAIT`]).

#![allow(dead_code)] // Each test binary uses a different part of the helpers.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// Longest a single wait of these helpers may take (generous: the test machine is shared).
pub const WAIT: Duration = Duration::from_secs(30);

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------------------------
// Broker guard
// ---------------------------------------------------------------------------------------------

/// A mosquitto process, killed (SIGKILL, by PID) on drop.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Extra mosquitto.conf lines (e.g. a TLS listener).
    extra: String,
}

impl Broker {
    /// Starts mosquitto on `port` (a free one if None) and waits until it accepts connections.
    pub async fn start(port: Option<u16>) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, port, String::new()).await
    }

    /// Same, with its config and log in `dir` and `extra` lines appended to its config.
    pub async fn start_in(dir: tempfile::TempDir, port: Option<u16>, extra: String) -> Broker {
        let mut b = Broker {
            child: None,
            port: port.unwrap_or_else(free_port),
            dir,
            extra,
        };
        b.restart().await;
        b
    }

    /// Starts it again on the same port (after [`Broker::kill`]).
    pub async fn restart(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        assert!(self.child.is_none(), "already running");
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                // No per-client queue bound: mosquitto's default (1000 QoS 1 messages beyond
                // those in flight) silently drops what a slow client has not taken yet — the
                // daemon's request connection during the 1000-command storm, or a watcher — which
                // a storm test on a loaded machine read as a missing acknowledgement.
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nmax_queued_messages 0\n{}",
                self.port, self.extra
            ),
        )
        .expect("write conf");
        // As root, mosquitto drops to user `mosquitto`: let it read its config.
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .expect("log");
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("mosquitto exited: {status}\n{}", self.log());
            }
            assert!(
                t0.elapsed() < WAIT,
                "mosquitto did not start\n{}",
                self.log()
            );
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// The PID of the running mosquitto (to stop and continue it: a broker that hangs).
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL (no clean shutdown: an outage).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Everything mosquitto logged so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// How many times a client with this id connected (from mosquitto's log).
    pub fn connections_of(&self, client_id: &str) -> usize {
        let needle = format!(" as {client_id} (");
        self.log()
            .lines()
            .filter(|l| l.contains("New client connected") && l.contains(&needle))
            .count()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Watcher: a PLC-like subscriber
// ---------------------------------------------------------------------------------------------

/// One message as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// When the subscriber received it (Unix epoch milliseconds).
    pub received_ms: u64,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.topic, self.text()))
    }

    /// A short description for failure messages (binary payloads by size only).
    pub fn describe(&self) -> String {
        if self.payload.starts_with(b"\x89PNG") {
            format!("{} <PNG, {} bytes>", self.topic, self.payload.len())
        } else {
            format!("{} {:?}", self.topic, self.text())
        }
    }
}

/// A separate MQTT client subscribed as a PLC would be.
pub struct Watcher {
    rx: mpsc::UnboundedReceiver<Msg>,
    subacks: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

static WATCHERS: AtomicU32 = AtomicU32::new(0);

impl Watcher {
    /// Connects to the broker on `port`, subscribes to `filter` (QoS 1) and re-subscribes after
    /// every reconnect; returns once the first subscription is acknowledged.
    pub async fn start(port: u16, filter: &str) -> Watcher {
        Self::start_as(port, filter, None).await
    }

    /// Same, logged in as `(user, password)` when given.
    pub async fn start_as(port: u16, filter: &str, login: Option<(&str, &str)>) -> Watcher {
        let id = format!(
            "watcher-{}-{}",
            std::process::id(),
            WATCHERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = watch::channel(0u64);
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => sub_tx.send_modify(|n| *n += 1),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            received_ms: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as u64),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => sleep(Duration::from_millis(20)).await,
                }
            }
        });
        let mut w = Watcher { rx, subacks, task };
        w.wait_subscribed(1).await;
        w
    }

    /// Waits until `n` subscriptions (one per connection) were acknowledged.
    pub async fn wait_subscribed(&mut self, n: u64) {
        timeout(WAIT, self.subacks.wait_for(|c| *c >= n))
            .await
            .expect("subscription not acknowledged in time")
            .expect("watcher ended");
    }

    /// Subscriptions acknowledged so far.
    pub fn subscriptions(&self) -> u64 {
        *self.subacks.borrow()
    }

    /// Next message on `topic`, skipping others.
    pub async fn next_on(&mut self, topic: &str) -> Msg {
        self.until(|m| m.topic == topic).await
    }

    /// Receives until a message matches; panics (with what was seen) after [`WAIT`].
    pub async fn until(&mut self, pred: impl FnMut(&Msg) -> bool) -> Msg {
        self.until_within(WAIT, pred).await
    }

    /// Receives until a message matches; panics (with the last messages seen) after `wait`.
    pub async fn until_within(
        &mut self,
        wait: Duration,
        mut pred: impl FnMut(&Msg) -> bool,
    ) -> Msg {
        let deadline = Instant::now() + wait;
        let mut seen = std::collections::VecDeque::new();
        loop {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.rx.recv(),
            )
            .await
            {
                Ok(Some(m)) if pred(&m) => return m,
                Ok(Some(m)) => {
                    if seen.len() == 40 {
                        seen.pop_front();
                    }
                    seen.push_back(m.describe());
                }
                Ok(None) => panic!("watcher ended"),
                Err(_) => panic!(
                    "no matching message in {wait:?}; last seen:\n{}",
                    Vec::from(seen).join("\n")
                ),
            }
        }
    }

    /// Every message received during the next `d` (benchmarks).
    pub async fn collect_for(&mut self, d: Duration) -> Vec<Msg> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok(Some(m)) = timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.rx.recv(),
        )
        .await
        {
            out.push(m);
        }
        out
    }

    /// The messages received and not yet consumed, without waiting.
    pub fn drain(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// TCP proxy with a gate: lets the test decide when a client may reach the broker again.
// ---------------------------------------------------------------------------------------------

/// Forwards connections on its own port to `upstream`; while closed, refuses them.
pub struct Proxy {
    pub port: u16,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (open, open_rx) = watch::channel(true);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !*open_rx.borrow() {
                    drop(inbound); // gate closed: the client sees the connection fail
                    continue;
                }
                conns.spawn(async move {
                    let up = SocketAddr::from((Ipv4Addr::LOCALHOST, upstream));
                    if let Ok(mut outbound) = TcpStream::connect(up).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy { port, open, task }
    }

    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

/// Publishes one message (QoS 1) as a fresh client, logged in as `login` when given, and waits
/// for the broker's PUBACK (10 s at most).
pub async fn publish_once(
    port: u16,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    retain: bool,
    login: Option<(&str, &str)>,
) {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!(
        "publisher-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.into())
        .await
        .expect("publish");
    timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(_) => sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the broker acknowledged the message");
    let _ = client.disconnect().await;
}
