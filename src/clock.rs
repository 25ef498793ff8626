//! Time as the fencing argument needs it: `CLOCK_BOOTTIME`, which keeps counting while the host is
//! suspended (a laptop lid, a paused VM, a frozen cgroup's host). Consul's session TTL runs on the
//! servers' clocks, which do not stop when this host does; a deadline measured on
//! `CLOCK_MONOTONIC` (what `std::time::Instant` and tokio use) would stretch by the length of a
//! suspend and let the child outlive the session. Renew send times and fence deadlines are
//! therefore [`BootTime`]s, and waiting for one uses a `CLOCK_BOOTTIME` timerfd, which fires at
//! once on resume if the deadline passed meanwhile.

use std::ops::{Add, Sub};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::time::{ClockId as TimeClockId, clock_gettime};

/// A moment on `CLOCK_BOOTTIME`: the time since the host booted, suspend included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootTime(Duration);

impl BootTime {
    /// Now. Panics if the clock cannot be read: it exists on every Linux since 2.6.39, and falling
    /// back to another clock would mix clocks in one deadline, which is unsound.
    pub fn now() -> BootTime {
        let ts = clock_gettime(TimeClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME is readable");
        BootTime(Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32))
    }

    /// Builds a moment from its offset since boot.
    pub fn from_since_boot(d: Duration) -> BootTime {
        BootTime(d)
    }

    /// The offset since boot: how a moment crosses a process boundary (the keeper's pipe).
    pub fn since_boot(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootTime) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// How long from now until this moment (zero once it has passed).
    pub fn remaining(self) -> Duration {
        self.saturating_duration_since(BootTime::now())
    }

    pub fn has_passed(self) -> bool {
        BootTime::now() >= self
    }
}

impl Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_add(d))
    }
}

impl Sub<Duration> for BootTime {
    type Output = BootTime;
    fn sub(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_sub(d))
    }
}

/// Resolves once `CLOCK_BOOTTIME` has reached `at`, suspend included. Cancel-safe.
pub async fn sleep_until(at: BootTime) {
    match boot_timer(at) {
        Ok(fd) => {
            while let Ok(mut guard) = fd.readable().await {
                if at.has_passed() {
                    return;
                }
                guard.clear_ready();
            }
        }
        Err(e) => tracing::debug!("no CLOCK_BOOTTIME timer ({e}); sleeping on the monotonic clock"),
    }
    // Fallback: the monotonic clock, re-checked, so that at worst a suspend makes us late by
    // one wake-up.
    loop {
        let left = at.remaining();
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
}

/// A timerfd, owned, seen through its raw descriptor (what tokio's `AsyncFd` asks for).
struct BootTimer(TimerFd);

impl std::os::fd::AsRawFd for BootTimer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

fn boot_timer(at: BootTime) -> std::io::Result<tokio::io::unix::AsyncFd<BootTimer>> {
    let timer = TimerFd::new(
        ClockId::CLOCK_BOOTTIME,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )?;
    // An absolute expiry of zero would disarm the timer: never ask for less than 1ns.
    let when = at.0.max(Duration::from_nanos(1));
    timer.set(
        Expiration::OneShot(TimeSpec::from_duration(when)),
        TimerSetTimeFlags::TFD_TIMER_ABSTIME,
    )?;
    // SAFETY: the descriptor is the timerfd that `BootTimer` owns; it stays open, and the same,
    // until the `AsyncFd` (which owns the `BootTimer`) is dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            BootTimer(timer),
            tokio::io::Interest::READABLE,
        )
    };
    fd.map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_moves_forward_and_adds() {
        let a = BootTime::now();
        let b = a + Duration::from_millis(5);
        assert!(b > a);
        assert_eq!(b.saturating_duration_since(a), Duration::from_millis(5));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        assert!(!b.has_passed() || BootTime::now() >= b);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sleep_until_waits_for_the_deadline() {
        let at = BootTime::now() + Duration::from_millis(30);
        sleep_until(at).await;
        assert!(at.has_passed());
        // A deadline in the past resolves at once.
        sleep_until(BootTime::from_since_boot(Duration::from_secs(1))).await;
    }
}
