//! How the daemon is told to stop or reload: one cancellation token and one reload request
//! channel, made by [`control`] and held on two sides.
//!
//! - [`ControlHandle`] (Clone) is the outside: `main` forwards SIGTERM/SIGINT/SIGHUP to it from
//!   its first instruction on (so a signal during start-up is never the default action, which
//!   would kill the process), and tests call it to run the daemon in-process.
//! - [`Control`] goes into [`super::run`], which hands the token to every stage that has to stop
//!   (cameras, the inference worker, the publisher) and gives them one shared deadline.
//!
//! Channel policy: the reload channel holds one request (capacity 1); further requests while
//! one is pending are merged into it (a reload reads the whole file anyway). A reload requested
//! before the daemon is ready is kept and carried out once it is (logged).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The outside of the daemon's control: stop and reload requests.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    shutdown: CancellationToken,
    reload: mpsc::Sender<()>,
}

/// The daemon's side: what [`super::run`] waits on.
#[derive(Debug)]
pub struct Control {
    /// Cancelled once, when the daemon is to stop.
    pub shutdown: CancellationToken,
    /// One pending reload request at most.
    pub reload: mpsc::Receiver<()>,
    /// The sending side, for stages inside the daemon that ask for a reload (the live view's
    /// region editor after it wrote the config file).
    requests: mpsc::Sender<()>,
}

/// A connected pair.
pub fn control() -> (ControlHandle, Control) {
    let shutdown = CancellationToken::new();
    let (tx, rx) = mpsc::channel(1);
    (
        ControlHandle {
            shutdown: shutdown.clone(),
            reload: tx.clone(),
        },
        Control {
            shutdown,
            reload: rx,
            requests: tx,
        },
    )
}

impl Control {
    /// A handle on this daemon's own stop and reload requests.
    pub fn handle(&self) -> ControlHandle {
        ControlHandle {
            shutdown: self.shutdown.clone(),
            reload: self.requests.clone(),
        }
    }
}

impl ControlHandle {
    /// Asks the daemon to stop. Returns false when a stop was already requested (a second
    /// signal: `main` then exits at once).
    pub fn stop(&self) -> bool {
        let first = !self.shutdown.is_cancelled();
        self.shutdown.cancel();
        first
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Asks for a reload; merged into a pending one. Never blocks.
    pub fn reload(&self) {
        let _ = self.reload.try_send(());
    }
}

/// The one stop deadline every stage shares: what is left of it for the next stage.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self(Instant::now() + budget)
    }

    /// Time left (zero once passed).
    pub fn left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// The instant, for tokio's `timeout_at`.
    pub fn instant(&self) -> Instant {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_stop_is_reported_as_such() {
        let (h, c) = control();
        assert!(!c.shutdown.is_cancelled());
        assert!(h.stop(), "first stop");
        assert!(c.shutdown.is_cancelled());
        assert!(!h.stop(), "second stop must say it was already stopping");
    }

    #[test]
    fn reload_requests_merge_and_never_block() {
        let (h, mut c) = control();
        for _ in 0..100 {
            h.reload();
        }
        assert!(c.reload.try_recv().is_ok());
        assert!(c.reload.try_recv().is_err(), "100 requests merged into one");
    }

    #[test]
    fn deadline_counts_down_to_zero() {
        let d = Deadline::after(Duration::from_millis(30));
        assert!(d.left() > Duration::ZERO);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(d.left(), Duration::ZERO);
    }
}
