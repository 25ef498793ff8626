//! systemd notifications (`Type=notify`): `READY=1` once the wrapper contends, so standby nodes do
//! not time out at start; `STATUS=` lines that say who leads; `WATCHDOG=1` only while the session
//! renews; `STOPPING=1` when the wrapper shuts down. Every call is a no-op without `NOTIFY_SOCKET`.
//!
//! `NOTIFY_SOCKET` and `WATCHDOG_*` are left in our own environment (changing the environment of a
//! threaded process is unsound) and removed from the child's instead.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    // An empty NOTIFY_SOCKET counts as unset, like every variable we read (sd-notify would try
    // to connect to "").
    if std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| v.is_empty()) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        debug!("cannot notify systemd: {e}");
    }
}

/// The wrapper is up and contending.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping systemd's watchdog (half its timeout), if it asked for pings.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .filter(|d| !d.is_zero())
}
