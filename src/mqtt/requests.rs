//! The request connection: the daemon's MQTT 5 subscriber for trigger requests
//! (`<prefix>/+/inspect`) and, with `[commands]`, commands (`<prefix>/cmd`), and the publisher
//! of answers to MQTT 5 response topics.
//!
//! Why a connection of its own: a PLC or Node-RED flow that speaks MQTT 5 may set a *response
//! topic* and *correlation data* on its request (MQTT 5 request/response); those properties
//! reach only an MQTT 5 subscriber. The publisher's connection ([`super::Publisher`]) stays MQTT
//! 3.1.1 (every broker and PLC client speaks it, and its Last Will and queues are unchanged);
//! this one, client id `<client_id>-req`, same broker, credentials and TLS, clean start,
//! subscribes (QoS 1) at every connect.
//!
//! Input: requests from the broker, each forwarded with its response topic and correlation data
//! ([`Inbound::response`], [`CommandIn::response`]); from the daemon, [`RequestLink::respond`].
//! Output: for a request that named a response topic, the same answer the plain contract gets
//! (the `inspection` JSON, the command acknowledgement) published on that topic with its
//! correlation data, QoS 1, not retained, once (not queued on disk, not replayed after a restart:
//! `<prefix>/<camera>/inspection` stays the guaranteed path). [`RequestLink::listening`] says
//! whether the subscriptions are in place (the trigger stage's `ready` includes it, so a PLC that
//! waits for `ready` never publishes into a gap).
//!
//! Failure modes: a subscription the broker refuses (an ACL) is logged and `listening` stays
//! false; broker unreachable → retried with `[mqtt]`'s capped backoff (one warning per
//! outage); a retained request is ignored (it would repeat at every reconnect; logged); an empty
//! payload is ignored; a full channel to the trigger stage drops the request (counted and
//! logged, as before); a full command channel answers `busy` on `<prefix>/cmd/ack`; a response
//! that cannot be handed to the connection is dropped with a warning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::MqttConfig;
use super::{Backoff, Inbound, MAX_PACKET_BYTES, PublisherError, PublisherHandle, read_tls};

/// Where an MQTT 5 requester wants its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTo {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
}

/// A command payload as it arrived (parsed by the daemon).
#[derive(Debug)]
pub struct CommandIn {
    pub payload: Vec<u8>,
    pub response: Option<ResponseTo>,
}

/// Capacity of the channel of commands to the daemon; beyond it a command is answered `busy`.
pub const COMMAND_CHANNEL: usize = 64;
/// Responses waiting for the connection.
const RESPONSE_CHANNEL: usize = 1024;
/// Longest response topic honoured.
const MAX_RESPONSE_TOPIC: usize = 256;

/// The daemon's handle: answers to response topics, and whether requests can arrive now.
#[derive(Clone)]
pub struct RequestLink {
    out: mpsc::Sender<(ResponseTo, Vec<u8>)>,
    listening: Arc<AtomicBool>,
}

impl RequestLink {
    /// Publishes `payload` on `to.topic` with its correlation data (QoS 1); never blocks.
    pub fn respond(&self, to: &ResponseTo, payload: Vec<u8>) {
        if self.out.try_send((to.clone(), payload)).is_err() {
            warn!(topic = %to.topic, "mqtt 5 response dropped: too many waiting");
        }
    }

    /// Whether the subscriptions are in place on a live connection.
    pub fn listening(&self) -> Arc<AtomicBool> {
        self.listening.clone()
    }
}

/// Where the link forwards what it receives.
pub struct Sinks {
    pub inbox: mpsc::Sender<Inbound>,
    pub commands: Option<mpsc::Sender<CommandIn>>,
    /// For the `busy` acknowledgement of a command the daemon has no room for.
    pub publisher: PublisherHandle,
}

/// Spawns the request connection on the current tokio runtime; it ends when `stop` is
/// cancelled.
pub fn spawn(
    cfg: &MqttConfig,
    node_id: &str,
    sinks: Sinks,
    stop: CancellationToken,
) -> Result<(RequestLink, JoinHandle<()>), PublisherError> {
    let tls = read_tls(cfg)?;
    let mut o = MqttOptions::new(
        format!("{}-req", cfg.client_id_for(node_id)),
        cfg.host.clone(),
        cfg.port,
    );
    o.set_keep_alive(super::keep_alive(cfg));
    o.set_clean_start(true);
    o.set_max_packet_size(Some(MAX_PACKET_BYTES as u32));
    if let Some((user, pass)) = super::login(cfg) {
        o.set_credentials(user, pass);
    }
    if let Some(tls) = &tls {
        o.set_transport(super::tls_transport(tls));
    }
    let (out_tx, out_rx) = mpsc::channel(RESPONSE_CHANNEL);
    let listening = Arc::new(AtomicBool::new(false));
    let link = RequestLink {
        out: out_tx,
        listening: listening.clone(),
    };
    let task = Task {
        prefix: cfg.prefix_for(node_id),
        opts: o,
        backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        sinks,
        listening,
        dropped: AtomicU64::new(0),
        logged_retained: false,
    };
    Ok((link, tokio::spawn(task.run(out_rx, stop))))
}

struct Task {
    prefix: String,
    opts: MqttOptions,
    backoff: Backoff,
    sinks: Sinks,
    listening: Arc<AtomicBool>,
    dropped: AtomicU64,
    logged_retained: bool,
}

impl Task {
    async fn run(
        mut self,
        mut out: mpsc::Receiver<(ResponseTo, Vec<u8>)>,
        stop: CancellationToken,
    ) {
        let (client, mut el) = AsyncClient::new(self.opts.clone(), 256);
        let topics: Vec<String> = std::iter::once(format!("{}/+/inspect", self.prefix))
            .chain(
                self.sinks
                    .commands
                    .is_some()
                    .then(|| format!("{}/cmd", self.prefix)),
            )
            .collect();
        let mut pending_subacks = 0usize;
        let mut outage_logged = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.listening.store(false, Ordering::Relaxed);
                    // The answers handed over before the stop go out first, then DISCONNECT.
                    while let Ok((to, payload)) = out.try_recv() {
                        Self::send(&client, &to, payload);
                    }
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(150), async {
                        while el.poll().await.is_ok() {}
                    })
                    .await;
                    break;
                }
                Some((to, payload)) = out.recv() => Self::send(&client, &to, payload),
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        self.backoff.reset();
                        outage_logged = false;
                        pending_subacks = 0;
                        for t in &topics {
                            match client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                                Ok(()) => pending_subacks += 1,
                                Err(e) => warn!(topic = %t, error = %e, "cannot subscribe to requests"),
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let refused: Vec<_> = ack
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .collect();
                        if !refused.is_empty() {
                            // `ready` stays false: requests would reach nobody.
                            warn!(codes = ?refused, "the broker refused a request subscription (an ACL?): trigger requests or commands cannot arrive");
                            continue;
                        }
                        pending_subacks = pending_subacks.saturating_sub(1);
                        if pending_subacks == 0 && !self.listening.swap(true, Ordering::Relaxed) {
                            info!(topics = ?topics, "listening for requests (MQTT 5)");
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(p),
                    Ok(_) => {}
                    Err(e) => {
                        self.listening.store(false, Ordering::Relaxed);
                        if !outage_logged {
                            warn!(error = %e, "request connection lost: trigger requests and commands wait for the reconnect");
                            outage_logged = true;
                        }
                        let wait = self.backoff.next();
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        debug!("request connection stopped");
    }

    /// Hands one response to the connection (QoS 1, with the correlation data).
    fn send(client: &AsyncClient, to: &ResponseTo, payload: Vec<u8>) {
        let props = PublishProperties {
            correlation_data: to.correlation.clone().map(Into::into),
            ..Default::default()
        };
        if let Err(e) = client.try_publish_with_properties(
            to.topic.clone(),
            QoS::AtLeastOnce,
            false,
            payload,
            props,
        ) {
            warn!(topic = %to.topic, error = %e, "mqtt 5 response not sent");
        }
    }

    fn on_publish(&mut self, p: Publish) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let rest = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|t| t.strip_prefix('/'));
        if p.payload.is_empty() {
            // An empty retained message clears a retained request: nothing to do.
            return;
        }
        if p.retain {
            if !self.logged_retained {
                warn!(
                    topic,
                    "a retained request or command is not acted on: publish with retain = false (clear it with an empty retained message)"
                );
                self.logged_retained = true;
            } else {
                debug!(topic, "retained request ignored");
            }
            return;
        }
        let response = p.properties.as_ref().and_then(|pr| {
            let t = pr.response_topic.as_ref()?;
            let ok = !t.is_empty()
                && t.len() <= MAX_RESPONSE_TOPIC
                && !t.contains(['+', '#'])
                && !t.chars().any(char::is_control);
            if !ok {
                warn!(topic, "mqtt 5 response topic not usable (empty, wildcard, control character or over 256 bytes): answered on the plain topics only");
                return None;
            }
            Some(ResponseTo {
                topic: t.clone(),
                correlation: pr.correlation_data.as_ref().map(|c| c.to_vec()),
            })
        });
        if rest == Some("cmd") {
            let Some(tx) = &self.sinks.commands else {
                return;
            };
            let payload = p.payload.to_vec();
            if let Err(e) = tx.try_send(CommandIn { payload, response }) {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(
                        topic,
                        refused = n,
                        "command refused: busy (the daemon is not keeping up with commands)"
                    );
                }
                let c = match e {
                    mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
                };
                self.sinks
                    .publisher
                    .command_ack(crate::commands::busy(&c.payload).to_json());
            }
            return;
        }
        let camera = rest
            .and_then(|t| t.strip_suffix("/inspect"))
            .filter(|c| !c.contains('/'));
        let Some(camera) = camera else {
            debug!(topic, "mqtt: message on an unexpected topic ignored");
            return;
        };
        let msg = Inbound {
            camera: camera.to_owned(),
            payload: p.payload.to_vec(),
            at: std::time::Instant::now(),
            at_unix_ms: super::now_ms(),
            response,
        };
        if self.sinks.inbox.try_send(msg).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(
                    topic,
                    dropped = n,
                    "trigger request dropped: the trigger stage is not keeping up"
                );
            }
        }
    }
}
