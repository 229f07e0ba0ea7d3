//! The camera → engine edge: a one-frame slot per camera (keep latest, count drops) and a
//! notifier shared by the slots, so one consumer can wait on all cameras at once.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// One decoded frame in packed RGB (3 bytes per pixel, R first), rows padded to `stride`.
pub struct Frame {
    /// The camera's index (as given to `Camera::spawn`).
    pub camera: usize,
    /// The camera's name.
    pub camera_name: Arc<str>,
    /// Per-camera sequence number of frames put into the slot: increasing by one per frame,
    /// never reused across reconnects. A gap seen by a consumer is the number of frames
    /// overwritten in the slot (frames skipped by `max_fps` get no number).
    pub seq: u64,
    /// Index of this frame's sample among the samples the camera pulled (the camera's
    /// `frames_in` before it, counting those skipped by `max_fps`): lets a consumer count
    /// scored frames in the same window as `frames_in` (see the daemon's stats).
    pub ordinal: u64,
    /// Wall clock, in milliseconds since the Unix epoch, when the decoded sample was pulled
    /// from the appsink (see the module documentation for what precedes it).
    pub capture_unix_ms: u64,
    /// The same instant on the monotonic clock.
    pub captured_at: Instant,
    /// The buffer's presentation timestamp (pipeline running time base), if it had one.
    /// Diagnostic only: it restarts with each pipeline.
    pub pts: Option<Duration>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes from the start of one row to the next (≥ `width * 3`; GStreamer pads RGB rows
    /// to a multiple of 4 bytes).
    pub stride: usize,
    /// `stride * height` bytes.
    pub data: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("camera", &self.camera)
            .field("camera_name", &self.camera_name)
            .field("seq", &self.seq)
            .field("capture_unix_ms", &self.capture_unix_ms)
            .field("pts", &self.pts)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("stride", &self.stride)
            .field("data_len", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl Frame {
    /// The `width * 3` pixel bytes of row `y`, without padding; `None` past the last row.
    pub fn row(&self, y: u32) -> Option<&[u8]> {
        if y >= self.height {
            return None;
        }
        let start = y as usize * self.stride;
        self.data.get(start..start + self.width as usize * 3)
    }

    /// The pixel at `(x, y)` as `[r, g, b]`; `None` outside the frame.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width {
            return None;
        }
        let row = self.row(y)?;
        let i = x as usize * 3;
        Some([row[i], row[i + 1], row[i + 2]])
    }

    /// A copy without row padding (`width * height * 3` bytes, rows contiguous).
    pub fn to_packed(&self) -> Vec<u8> {
        let row_len = self.width as usize * 3;
        let mut out = Vec::with_capacity(row_len * self.height as usize);
        for y in 0..self.height {
            if let Some(row) = self.row(y) {
                out.extend_from_slice(row);
            }
        }
        out
    }
}

/// Wakes consumers when any slot sharing it receives a frame.
///
/// Race-free waiting: read [`FrameNotify::generation`], look at the slots, then
/// [`FrameNotify::wait_changed`] with that generation — a frame put in between makes the wait
/// return at once. [`FrameNotify::take_any`] does all of it.
#[derive(Debug, Default)]
pub struct FrameNotify {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl FrameNotify {
    /// A new notifier, to share between slots and the consumer.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Signals every waiter.
    pub fn notify(&self) {
        let mut g = self.lock();
        *g = g.wrapping_add(1);
        drop(g);
        self.cv.notify_all();
    }

    /// The current generation (incremented by every [`FrameNotify::notify`]).
    pub fn generation(&self) -> u64 {
        *self.lock()
    }

    /// Waits until the generation differs from `seen` or `timeout` passes; returns the
    /// generation then (equal to `seen` on timeout).
    pub fn wait_changed(&self, seen: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while *g == seen {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *g
    }

    /// Takes every frame available in `slots` (at most one per slot, in slot order), waiting
    /// up to `timeout` for the first one. Empty on timeout. Call from a blocking thread.
    pub fn take_any(&self, slots: &[Arc<LatestSlot>], timeout: Duration) -> Vec<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.generation();
            let frames: Vec<Frame> = slots.iter().filter_map(|s| s.take()).collect();
            if !frames.is_empty() {
                return frames;
            }
            let now = Instant::now();
            if now >= deadline {
                return frames;
            }
            self.wait_changed(seen, deadline - now);
        }
    }
}

/// Holds the latest unconsumed frame of one camera. Full-policy: **overwrite, count a drop**.
#[derive(Debug)]
pub struct LatestSlot {
    frame: Mutex<Option<Frame>>,
    notify: Arc<FrameNotify>,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl LatestSlot {
    /// An empty slot that signals `notify` on every put.
    pub fn new(notify: Arc<FrameNotify>) -> Self {
        Self {
            frame: Mutex::new(None),
            notify,
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Frame>> {
        self.frame.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `frame`, replacing (and counting as dropped) an unconsumed one; wakes waiters.
    /// Returns `true` if a frame was dropped.
    pub fn put(&self, frame: Frame) -> bool {
        let replaced = self.lock().replace(frame).is_some();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if replaced {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify();
        replaced
    }

    /// Takes the frame, if any.
    pub fn take(&self) -> Option<Frame> {
        self.lock().take()
    }

    /// Frames put so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Frames overwritten before they were taken.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The notifier this slot signals.
    pub fn notify(&self) -> &Arc<FrameNotify> {
        &self.notify
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, width: u32, height: u32, stride: usize) -> Frame {
        Frame {
            camera: 0,
            camera_name: Arc::from("t"),
            seq,
            ordinal: seq,
            capture_unix_ms: 0,
            captured_at: Instant::now(),
            pts: None,
            width,
            height,
            stride,
            data: (0..stride * height as usize).map(|i| i as u8).collect(),
        }
    }

    #[test]
    fn overwrite_counts_a_drop() {
        let slot = LatestSlot::new(FrameNotify::new());
        assert!(!slot.put(frame(0, 1, 1, 4)));
        assert!(slot.put(frame(1, 1, 1, 4)));
        assert!(slot.put(frame(2, 1, 1, 4)));
        assert_eq!(slot.take().map(|f| f.seq), Some(2));
        assert!(slot.take().is_none());
        assert!(!slot.put(frame(3, 1, 1, 4)));
        assert_eq!((slot.delivered(), slot.dropped()), (4, 2));
    }

    #[test]
    fn take_any_wakes_on_put_from_another_thread() {
        let notify = FrameNotify::new();
        let slots = vec![
            Arc::new(LatestSlot::new(Arc::clone(&notify))),
            Arc::new(LatestSlot::new(Arc::clone(&notify))),
        ];
        let producer = {
            let slot = Arc::clone(&slots[1]);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                slot.put(frame(7, 1, 1, 4));
            })
        };
        let started = Instant::now();
        let frames = notify.take_any(&slots, Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(frames.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![7]);
        producer.join().expect("producer thread");
    }

    #[test]
    fn take_any_times_out_empty() {
        let notify = FrameNotify::new();
        let slots = vec![Arc::new(LatestSlot::new(Arc::clone(&notify)))];
        let started = Instant::now();
        assert!(
            notify
                .take_any(&slots, Duration::from_millis(30))
                .is_empty()
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn rows_skip_padding() {
        // 2x2 RGB with 8-byte rows (6 bytes of pixels + 2 of padding).
        let f = frame(0, 2, 2, 8);
        assert_eq!(f.row(1), Some(&[8u8, 9, 10, 11, 12, 13][..]));
        assert_eq!(f.row(2), None);
        assert_eq!(f.pixel(1, 1), Some([11, 12, 13]));
        assert_eq!(f.pixel(2, 0), None);
        assert_eq!(f.to_packed(), vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    }
}
