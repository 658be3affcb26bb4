//! [`Clock`]: the one source of time for the threat pipeline — wall-clock milliseconds for windows,
//! TTLs and events, and a monotonic reading for the `governor` rate limiters. Tests use a manual
//! clock and advance it, so no filter test sleeps.

use governor::nanos::Nanos;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug)]
enum Source {
    System {
        start: Instant,
    },
    /// Milliseconds since the Unix epoch, set by the test.
    Manual(AtomicU64),
}

/// A shareable clock.
#[derive(Debug, Clone)]
pub struct Clock(Arc<Source>);

thread_local! {
    /// While this thread handles one batch of datagrams ([`Hold`]): the wall-clock milliseconds
    /// and the instant read when it began.
    static HELD: Cell<Option<(u64, Instant)>> = const { Cell::new(None) };
}

/// The system clock held at one reading on this thread until dropped. A UDP receive thread holds
/// it over each batch, so every message of the batch is timed as of the batch's start: two clock
/// reads a batch rather than several a message (the firewall's windows, the limiters' cells).
/// A batch is handled in well under a millisecond at any load the edge takes.
pub struct Hold(Instant);

impl Hold {
    pub fn now() -> Hold {
        let at = Instant::now();
        HELD.set(Some((unix_ms(), at)));
        Hold(at)
    }

    /// The instant the hold was taken.
    pub fn instant(&self) -> Instant {
        self.0
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        HELD.set(None);
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock nanoseconds since the Unix epoch (the clock of kernel receive timestamps).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(Source::System {
            start: Instant::now(),
        }))
    }

    /// A clock that stands at `unix_ms` until advanced.
    pub fn manual(unix_ms: u64) -> Clock {
        Clock(Arc::new(Source::Manual(AtomicU64::new(unix_ms))))
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance_ms(&self, ms: u64) {
        if let Source::Manual(t) = &*self.0 {
            t.fetch_add(ms, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &*self.0 {
            Source::System { .. } => HELD.get().map_or_else(unix_ms, |(ms, _)| ms),
            Source::Manual(t) => t.load(Ordering::Relaxed),
        }
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match &*self.0 {
            Source::System { start } => Nanos::from(
                HELD.get()
                    .map_or_else(Instant::now, |(_, at)| at)
                    .saturating_duration_since(*start),
            ),
            Source::Manual(t) => Nanos::from(t.load(Ordering::Relaxed).saturating_mul(1_000_000)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::Clock as _;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        let n0 = c.now();
        c.advance_ms(250);
        assert_eq!(c.now_ms(), 1_250);
        assert_eq!(
            std::time::Duration::from(governor::clock::Reference::duration_since(&c.now(), n0)),
            std::time::Duration::from_millis(250)
        );
        let s = Clock::system();
        assert!(s.now_ms() > 1_600_000_000_000);
    }

    /// A hold freezes the system clock on its own thread only, and only while it lives.
    #[test]
    fn a_hold_freezes_this_threads_system_clock_until_dropped() {
        let c = Clock::system();
        let (ms, nanos);
        {
            let hold = Hold::now();
            ms = c.now_ms();
            nanos = c.now();
            std::thread::sleep(std::time::Duration::from_millis(5));
            assert_eq!((c.now_ms(), c.now()), (ms, nanos), "held");
            assert!(hold.instant().elapsed() >= std::time::Duration::from_millis(5));
            // Another thread reads the running clock.
            let other = c.clone();
            let there = std::thread::spawn(move || other.now_ms()).join().unwrap();
            assert!(there >= ms + 5, "{there} vs {ms}");
        }
        assert!(c.now_ms() >= ms + 5, "released");
        assert!(c.now() > nanos);
        // A manual clock ignores holds.
        let m = Clock::manual(7);
        let _hold = Hold::now();
        assert_eq!(m.now_ms(), 7);
    }
}
