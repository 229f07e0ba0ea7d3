//! Alarm debouncer: turns a stream of per-frame "over threshold" booleans into debounced alarm
//! transitions.
//!
//! Input: one boolean per scored frame (`score >= threshold`), in frame order.
//! Output: `Some(Transition::Raised)` when at least `raise_count` (N) of the last `raise_window`
//! (M) frames were over the threshold while the alarm was clear; `Some(Transition::Cleared)` after
//! `clear_count` (K) consecutive frames below it while the alarm was raised; `None` otherwise.
//! Only transitions are emitted, never the steady state.
//!
//! Hysteresis: the window is emptied when the alarm clears (and when it raises), so a new alarm
//! needs N fresh frames over the threshold; stale "over" frames from before the clear can not
//! re-raise it at once. While raised, a single frame over the threshold restarts the clear count.
//!
//! Failure modes: none at run time. An invalid [`DebounceConfig`] (N = 0, M = 0, N > M, K = 0)
//! is rejected by [`Debouncer::new`]; the config loader reports it earlier with its TOML line.

use std::collections::VecDeque;

use thiserror::Error;

/// Largest accepted `raise_window` (M): the window is kept as a ring of booleans.
pub const MAX_WINDOW: u32 = 1000;

/// Debounce parameters of one camera (`[camera.alarm]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebounceConfig {
    /// N: frames over the threshold, within the window, that raise the alarm.
    pub raise_count: u32,
    /// M: the window, in frames.
    pub raise_window: u32,
    /// K: consecutive frames below the threshold that clear a raised alarm.
    pub clear_count: u32,
    /// A latched alarm stays raised after K frames below the threshold until it is
    /// acknowledged ([`Debouncer::acknowledge`]); `false`: it clears by itself.
    pub latch: bool,
}

impl Default for DebounceConfig {
    fn default() -> Self {
        Self {
            raise_count: default_raise_count(),
            raise_window: default_raise_window(),
            clear_count: default_clear_count(),
            latch: false,
        }
    }
}

/// Default N: 3 frames over the threshold …
pub const fn default_raise_count() -> u32 {
    3
}
/// … of the last 5 (M) …
pub const fn default_raise_window() -> u32 {
    5
}
/// … and 5 consecutive frames below (K) to clear.
pub const fn default_clear_count() -> u32 {
    5
}

/// A debounce configuration that can not work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DebounceError {
    #[error("raise_count must be at least 1")]
    ZeroRaiseCount,
    #[error("raise_window must be between 1 and {MAX_WINDOW}, got {0}")]
    BadWindow(u32),
    #[error("raise_count ({count}) must not exceed raise_window ({window})")]
    CountOverWindow { count: u32, window: u32 },
    #[error("clear_count must be at least 1")]
    ZeroClearCount,
}

impl DebounceConfig {
    /// Checks the invariants `1 <= N <= M <= MAX_WINDOW` and `K >= 1`.
    pub fn validate(&self) -> Result<(), DebounceError> {
        if self.raise_count == 0 {
            return Err(DebounceError::ZeroRaiseCount);
        }
        if self.raise_window == 0 || self.raise_window > MAX_WINDOW {
            return Err(DebounceError::BadWindow(self.raise_window));
        }
        if self.raise_count > self.raise_window {
            return Err(DebounceError::CountOverWindow {
                count: self.raise_count,
                window: self.raise_window,
            });
        }
        if self.clear_count == 0 {
            return Err(DebounceError::ZeroClearCount);
        }
        Ok(())
    }
}

/// A debounced change of the alarm state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The alarm became active.
    Raised,
    /// The alarm became inactive.
    Cleared,
}

impl Transition {
    /// The alarm state after this transition (`true` = active).
    pub fn active(self) -> bool {
        matches!(self, Transition::Raised)
    }
}

/// What an acknowledgement did ([`Debouncer::acknowledge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// No alarm was raised: nothing to acknowledge.
    NotRaised,
    /// The alarm was held by its latch after the condition had gone: it clears now (the
    /// caller publishes the clear).
    Cleared,
    /// The condition is still present (or the alarm is not latched): the alarm clears by itself
    /// after `clear_count` frames below the threshold.
    Pending,
}

/// Debouncer state of one camera. Cheap: a ring of at most M booleans and two counters.
#[derive(Debug, Clone)]
pub struct Debouncer {
    cfg: DebounceConfig,
    /// Last frames while clear (`true` = over), at most M, oldest first.
    window: VecDeque<bool>,
    /// Number of `true` in `window`.
    over_in_window: u32,
    /// Consecutive frames below the threshold while active.
    below_run: u32,
    active: bool,
    /// Latched: the clear condition was met and the alarm waits for an acknowledgement.
    held: bool,
    /// Latched: acknowledged while the condition was still present, so the next clear
    /// condition clears it.
    acked: bool,
}

impl Debouncer {
    /// A clear debouncer. Fails on an invalid configuration.
    pub fn new(cfg: DebounceConfig) -> Result<Self, DebounceError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            window: VecDeque::with_capacity(cfg.raise_window as usize),
            over_in_window: 0,
            below_run: 0,
            active: false,
            held: false,
            acked: false,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> DebounceConfig {
        self.cfg
    }

    /// Whether the alarm is raised now.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Whether a latched alarm is held: its condition has gone, it waits for an
    /// acknowledgement.
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Feeds one frame; returns the transition it caused, if any.
    pub fn update(&mut self, over: bool) -> Option<Transition> {
        if self.active {
            if over {
                self.below_run = 0;
                self.held = false;
                return None;
            }
            self.below_run = self.below_run.saturating_add(1);
            if self.below_run >= self.cfg.clear_count {
                if self.cfg.latch && !self.acked {
                    self.held = true;
                    return None;
                }
                self.active = false;
                self.clear_history();
                return Some(Transition::Cleared);
            }
            return None;
        }

        if self.window.len() == self.cfg.raise_window as usize
            && let Some(oldest) = self.window.pop_front()
            && oldest
        {
            self.over_in_window -= 1;
        }
        self.window.push_back(over);
        if over {
            self.over_in_window += 1;
        }
        if self.over_in_window >= self.cfg.raise_count {
            self.active = true;
            self.clear_history();
            return Some(Transition::Raised);
        }
        None
    }

    /// An operator's acknowledgement. A latched alarm whose condition has gone clears now
    /// ([`AckOutcome::Cleared`]: the caller publishes the clear); one whose condition is still
    /// present clears by itself once it has gone ([`AckOutcome::Pending`]). An unlatched raised
    /// alarm is [`AckOutcome::Pending`] too (it clears by itself anyway).
    pub fn acknowledge(&mut self) -> AckOutcome {
        if !self.active {
            return AckOutcome::NotRaised;
        }
        if self.held {
            self.active = false;
            self.clear_history();
            return AckOutcome::Cleared;
        }
        self.acked = true;
        AckOutcome::Pending
    }

    /// Switches to a new configuration (a config reload) **keeping the alarm state**: a raised
    /// alarm stays raised and clears under the new `clear_count`, so the state the subscribers
    /// were last told is never silently forgotten. The history (window, clear count) restarts.
    pub fn reconfigure(&mut self, cfg: DebounceConfig) -> Result<(), DebounceError> {
        cfg.validate()?;
        self.cfg = cfg;
        self.window = VecDeque::with_capacity(cfg.raise_window as usize);
        self.clear_history();
        Ok(())
    }

    /// Sets the alarm state known from before a restart, without reporting a transition (the
    /// subscribers were told it then). A restored raised alarm clears after `clear_count`
    /// normal frames, as any other.
    pub fn restore(&mut self, active: bool) {
        self.active = active;
        self.clear_history();
    }

    /// Forgets the history (e.g. after the camera reconnects). Returns `Some(Cleared)` if the
    /// alarm was active, so the caller can publish the clear.
    pub fn reset(&mut self) -> Option<Transition> {
        let was_active = self.active;
        self.active = false;
        self.clear_history();
        was_active.then_some(Transition::Cleared)
    }

    fn clear_history(&mut self) {
        self.window.clear();
        self.over_in_window = 0;
        self.below_run = 0;
        self.held = false;
        self.acked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deb(n: u32, m: u32, k: u32) -> Debouncer {
        Debouncer::new(DebounceConfig {
            raise_count: n,
            raise_window: m,
            clear_count: k,
            latch: false,
        })
        .expect("valid config")
    }

    /// Runs a pattern ("1" over, "0" below) and returns the transitions as a string:
    /// "R" raised, "C" cleared, "." nothing.
    fn run(d: &mut Debouncer, pattern: &str) -> String {
        pattern
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| match d.update(c == '1') {
                Some(Transition::Raised) => 'R',
                Some(Transition::Cleared) => 'C',
                None => '.',
            })
            .collect()
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mk = |n, m, k| {
            Debouncer::new(DebounceConfig {
                raise_count: n,
                raise_window: m,
                clear_count: k,
                latch: false,
            })
            .err()
        };
        assert_eq!(mk(0, 5, 1), Some(DebounceError::ZeroRaiseCount));
        assert_eq!(mk(1, 0, 1), Some(DebounceError::BadWindow(0)));
        assert_eq!(
            mk(1, MAX_WINDOW + 1, 1),
            Some(DebounceError::BadWindow(MAX_WINDOW + 1))
        );
        assert_eq!(
            mk(6, 5, 1),
            Some(DebounceError::CountOverWindow {
                count: 6,
                window: 5
            })
        );
        assert_eq!(mk(1, 1, 0), Some(DebounceError::ZeroClearCount));
        assert!(mk(5, 5, 1).is_none());
    }

    #[test]
    fn n_equals_m_equals_1_and_k_1_follows_every_frame() {
        let mut d = deb(1, 1, 1);
        assert_eq!(run(&mut d, "0 1 1 0 0 1 0 1"), ".R.C.RCR");
        assert!(d.is_active());
    }

    #[test]
    fn raises_after_n_of_last_m() {
        let mut d = deb(3, 5, 2);
        // Over frames at positions 1, 3, 5 of a 5-window: the third one raises.
        assert_eq!(run(&mut d, "1 0 1 0 1"), "....R");
    }

    #[test]
    fn over_frames_outside_the_window_do_not_count() {
        let mut d = deb(3, 5, 2);
        // 1 0 0 0 0 1 0 1: the first "1" left the window when the third arrived.
        assert_eq!(run(&mut d, "1 0 0 0 0 1 0 1"), "........");
        // One more inside the window raises.
        assert_eq!(run(&mut d, "1"), "R");
    }

    #[test]
    fn clears_after_k_consecutive_below_and_over_restarts_the_count() {
        let mut d = deb(1, 1, 3);
        assert_eq!(run(&mut d, "1 0 0 1 0 0 0"), "R.....C");
        assert!(!d.is_active());
    }

    #[test]
    fn flapping_signal_is_debounced() {
        // Alternating over/below: 3 of 5 raises once, K=2 never reached while it keeps flapping.
        let mut d = deb(3, 5, 2);
        let out = run(&mut d, "1 0 1 0 1 0 1 0 1 0 1 0");
        assert_eq!(out, "....R.......");
        assert!(d.is_active());
        // Two below in a row clear it.
        assert_eq!(run(&mut d, "0"), "C");
    }

    #[test]
    fn no_immediate_re_raise_from_stale_window_after_clear() {
        // N=3, M=10, K=1: after the clear, one over frame must not re-raise.
        let mut d = deb(3, 10, 1);
        assert_eq!(run(&mut d, "1 1 1 0 1"), "..RC.");
        assert_eq!(run(&mut d, "1 1"), ".R");
    }

    #[test]
    fn steady_state_emits_nothing() {
        let mut d = deb(2, 3, 2);
        assert_eq!(run(&mut d, "0000000000"), "..........");
        assert_eq!(run(&mut d, "1111111111"), ".R........");
        assert_eq!(run(&mut d, "0000000000"), ".C........");
    }

    #[test]
    fn reset_reports_clear_only_when_active() {
        let mut d = deb(1, 1, 5);
        assert_eq!(d.reset(), None);
        assert_eq!(run(&mut d, "1"), "R");
        assert_eq!(d.reset(), Some(Transition::Cleared));
        assert!(!d.is_active());
        assert_eq!(run(&mut d, "0"), ".");
    }

    #[test]
    fn reconfigure_keeps_a_raised_alarm_and_applies_the_new_counts() {
        let mut d = deb(1, 1, 1);
        assert_eq!(run(&mut d, "1"), "R");
        d.reconfigure(DebounceConfig {
            raise_count: 2,
            raise_window: 3,
            clear_count: 2,
            latch: false,
        })
        .expect("valid");
        assert!(d.is_active(), "a raised alarm is not forgotten by a reload");
        assert_eq!(run(&mut d, "0 0"), ".C");
        assert_eq!(run(&mut d, "1 0 1"), "..R");
        assert!(d.reconfigure(DebounceConfig::default()).is_ok());
        assert!(d.is_active());
        let bad = DebounceConfig {
            raise_count: 0,
            ..DebounceConfig::default()
        };
        assert_eq!(d.reconfigure(bad), Err(DebounceError::ZeroRaiseCount));
        assert_eq!(d.config(), DebounceConfig::default());
    }

    #[test]
    fn a_latched_alarm_waits_for_its_acknowledgement() {
        let mut d = Debouncer::new(DebounceConfig {
            raise_count: 1,
            raise_window: 1,
            clear_count: 2,
            latch: true,
        })
        .expect("valid");
        assert_eq!(d.acknowledge(), AckOutcome::NotRaised);
        assert_eq!(run(&mut d, "1 0 0 0 0"), "R....", "held, not cleared");
        assert!(d.is_active() && d.is_held());
        // The condition returns: no longer held, still raised.
        assert_eq!(run(&mut d, "1"), ".");
        assert!(d.is_active() && !d.is_held());
        assert_eq!(run(&mut d, "0 0"), "..");
        assert_eq!(d.acknowledge(), AckOutcome::Cleared);
        assert!(!d.is_active() && !d.is_held());
        // Acknowledged while the condition is present: clears on its own K normal frames.
        assert_eq!(run(&mut d, "1 1"), "R.");
        assert_eq!(d.acknowledge(), AckOutcome::Pending);
        assert_eq!(run(&mut d, "0 0"), ".C");
        // The acknowledgement is for that alarm only: the next one latches again.
        assert_eq!(run(&mut d, "1 0 0 0"), "R...");
        assert!(d.is_held());
    }

    #[test]
    fn an_unlatched_alarm_acknowledged_clears_by_itself() {
        let mut d = deb(1, 1, 2);
        assert_eq!(run(&mut d, "1"), "R");
        assert_eq!(d.acknowledge(), AckOutcome::Pending);
        assert!(d.is_active());
        assert_eq!(run(&mut d, "0 0"), ".C");
    }

    #[test]
    fn restored_raised_alarm_clears_after_k_normal_frames() {
        let mut d = deb(1, 1, 2);
        d.restore(true);
        assert!(d.is_active());
        assert_eq!(run(&mut d, "0 1 0 0"), "...C");
        d.restore(false);
        assert_eq!(run(&mut d, "1"), "R");
    }

    #[test]
    fn n_equals_m_requires_every_frame_over() {
        let mut d = deb(4, 4, 1);
        assert_eq!(run(&mut d, "1 1 1 0 1 1 1 1"), ".......R");
    }
}
