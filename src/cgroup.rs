//! A cgroup v2 of its own for the command, where the machine allows it: the one container the
//! kernel keeps complete no matter how a process forks, re-parents or calls `setsid`, killed in
//! one atomic step (`cgroup.kill`, Linux 5.14) and watched without polling (`cgroup.events`).
//! This is what systemd itself does with a unit's processes.
//!
//! The wrapper decides at run time whether a cgroup may be used ([`detect`]); the keeper creates
//! it under the wrapper's own cgroup, starts the command in it (created straight into it with
//! `clone3(CLONE_INTO_CGROUP)`, or moved into it before its `exec` where `clone3` is refused: a
//! move waits for an RCU grace period in the kernel, several milliseconds on a busy host), kills
//! through it, and removes it once it is empty ([`Cgroup`]). Nothing depends on it: without a
//! cgroup, the keeper's walk down its own subtree (it is the command's parent and subreaper) finds
//! the same processes, and in a cgroup the keeper walks that subtree as well, because a process
//! running as root may move itself out of any cgroup but never out of its ancestry.
//!
//! # When a cgroup is used
//!
//! Only where writing into our own cgroup is both possible and ours to do:
//!
//! - there is a cgroup v2 hierarchy (`0::` line of `/proc/self/cgroup`, and its `cgroup2` mount in
//!   `/proc/self/mountinfo`; on a hybrid host that is not `/sys/fs/cgroup` but, for example,
//!   `/sys/fs/cgroup/unified`), and we may write to our cgroup's directory;
//! - and the cgroup is ours to subdivide: under systemd (`/run/systemd/system` exists) only a
//!   cgroup that systemd delegated to the service, which it marks with the `trusted.delegate` (or
//!   `user.delegate`) extended attribute on the unit's cgroup (systemd 251 or later; set by
//!   `Delegate=yes`); systemd's rule is that nobody else creates cgroups in its tree. Without
//!   systemd, or at the root of a cgroup namespace (a container), any writable cgroup is ours.
//!
//! `CONSUL_LEADER_CGROUP` overrides the decision, for tests and troubleshooting: `off` never uses
//! a cgroup, `on` skips the systemd delegation check (for `Delegate=yes` under a systemd older
//! than 251, which sets no marker); `auto` (the default) is the rule above. Even when chosen, the
//! keeper falls back to no cgroup if the kernel lacks `cgroup.kill` or the command cannot be placed
//! in the new cgroup, and the wrapper logs why.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable that overrides [`detect`]: `auto` (default), `on` or `off`.
pub const ENV: &str = "CONSUL_LEADER_CGROUP";

/// Where the command's cgroup goes, as the wrapper decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Create the command's cgroup in this directory (the wrapper's own cgroup).
    Under(PathBuf),
    /// No cgroup, for this reason (a phrase for the log).
    Nowhere(String),
}

/// Decides whether the command gets a cgroup of its own, and where (module docs).
pub fn detect() -> Placement {
    let mode = std::env::var(ENV).unwrap_or_default();
    let mode = mode.trim().to_ascii_lowercase();
    let assume_delegated = match mode.as_str() {
        "off" => return Placement::Nowhere(format!("{ENV}=off")),
        "on" => true,
        "" | "auto" => false,
        other => {
            tracing::warn!("{ENV}={other} is not auto, on or off; using auto");
            false
        }
    };
    let cgroup = match std::fs::read_to_string("/proc/self/cgroup") {
        Ok(text) => text,
        Err(err) => return Placement::Nowhere(format!("cannot read /proc/self/cgroup: {err}")),
    };
    let Some(own) = own_cgroup_v2(&cgroup) else {
        return Placement::Nowhere("no cgroup v2 hierarchy (cgroup v1 only)".into());
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some((mount_point, mount_root)) = cgroup2_mount(&mountinfo) else {
        return Placement::Nowhere("the cgroup v2 hierarchy is not mounted".into());
    };
    let Some(dir) = resolve(&mount_point, &mount_root, &own) else {
        return Placement::Nowhere(format!(
            "our cgroup {own} is outside the mounted part of the hierarchy ({mount_root})"
        ));
    };
    if !dir.is_dir() {
        return Placement::Nowhere(format!("{} is not a directory", dir.display()));
    }
    let namespace_root = own == "/";
    if !namespace_root && !assume_delegated && systemd_runs() && !delegated(&dir, &mount_point) {
        return Placement::Nowhere(format!(
            "our cgroup {own} belongs to systemd and is not delegated to us (Delegate=yes)"
        ));
    }
    if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_err() {
        return Placement::Nowhere(format!("no write access to {}", dir.display()));
    }
    Placement::Under(dir)
}

/// The path of the `0::` (cgroup v2) line of `/proc/<pid>/cgroup`.
pub fn own_cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim().to_owned())
        .filter(|path| path.starts_with('/'))
}

/// The mount point and root of the first `cgroup2` mount in `/proc/<pid>/mountinfo`. Fields:
/// `id parent major:minor root mount-point options [optional...] - fstype source super-options`.
pub fn cgroup2_mount(text: &str) -> Option<(PathBuf, String)> {
    text.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_ascii_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = before.split_ascii_whitespace().skip(3);
        let root = unescape(fields.next()?);
        let point = unescape(fields.next()?);
        Some((PathBuf::from(point), root))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok());
            if let Some(byte) = octal {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` (as `/proc/self/cgroup` names it) under a mount of the
/// hierarchy at `point` whose root is `root`; `None` if the mount does not show it.
pub fn resolve(point: &Path, root: &str, path: &str) -> Option<PathBuf> {
    let rest = if root == "/" {
        path
    } else {
        let tail = path.strip_prefix(root)?;
        if !(tail.is_empty() || tail.starts_with('/')) {
            return None;
        }
        tail
    };
    let rest = rest.trim_start_matches('/');
    Some(if rest.is_empty() {
        point.to_path_buf()
    } else {
        point.join(rest)
    })
}

/// Whether systemd is the service manager (what `sd_booted()` checks).
fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Whether systemd marked `dir`, or an ancestor below the mount point, as delegated.
fn delegated(dir: &Path, mount_point: &Path) -> bool {
    let mut at = Some(dir);
    while let Some(path) = at {
        if !path.starts_with(mount_point) {
            break;
        }
        if ["trusted.delegate", "user.delegate"]
            .iter()
            .any(|name| xattr_is_true(path, name))
        {
            return true;
        }
        if path == mount_point {
            break;
        }
        at = path.parent();
    }
    false
}

fn xattr_is_true(path: &Path, name: &str) -> bool {
    let (Ok(path), Ok(name)) = (
        CString::new(path.as_os_str().as_bytes()),
        CString::new(name),
    ) else {
        return false;
    };
    let mut buf = [0u8; 8];
    // SAFETY: both strings are NUL-terminated and live across the call; getxattr writes at most
    // `buf.len()` bytes into `buf`.
    let n = unsafe {
        nix::libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n > 0 && matches!(&buf[..n as usize], b"1" | b"1\n" | b"yes" | b"true")
}

/// The command's cgroup, as the keeper holds it.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    /// The directory itself, open: `clone3(CLONE_INTO_CGROUP)` takes it.
    handle: File,
    procs: File,
    events: File,
    kill: File,
}

impl Cgroup {
    /// Creates the cgroup `name` under `parent` and opens the files the keeper needs. Fails, and
    /// leaves nothing behind, where the kernel has no `cgroup.kill` (before Linux 5.14).
    pub fn create(parent: &Path, name: &str) -> io::Result<Cgroup> {
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            // Left by a keeper that had our pid and was killed: reuse it if it is empty.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
        let opened = (|| {
            let kill = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.kill"))
                .map_err(|err| match err.kind() {
                    io::ErrorKind::NotFound => io::Error::new(
                        io::ErrorKind::Unsupported,
                        "no cgroup.kill (Linux 5.14 or later has it)",
                    ),
                    _ => err,
                })?;
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?;
            let events = File::open(dir.join("cgroup.events"))?;
            let handle = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECTORY)
                .open(&dir)?;
            Ok(Cgroup {
                dir: dir.clone(),
                handle,
                procs,
                events,
                kill,
            })
        })();
        if opened.is_err() {
            let _ = std::fs::remove_dir(&dir);
        }
        opened
    }

    /// The cgroup's directory, for `clone3(CLONE_INTO_CGROUP)`: a process created straight into
    /// the cgroup, without the migration below.
    pub fn dir_fd(&self) -> RawFd {
        self.handle.as_raw_fd()
    }

    /// `cgroup.procs`, open for writing: writing `0` to it moves the writer into the cgroup, which
    /// the command does between fork and exec, before it can start anything. The fallback where
    /// `clone3` is refused: a migration waits for an RCU grace period in the kernel (0.3 to 16 ms
    /// measured), a creation into the cgroup does not.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// `cgroup.events`, for `poll(POLLPRI)`: it signals every change of `populated`.
    pub fn events_fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// SIGKILLs every process in the cgroup at once (the kernel also catches processes forking
    /// meanwhile).
    pub fn kill(&self) -> io::Result<()> {
        (&self.kill).write_all_at_start(b"1")
    }

    /// Whether any process is in the cgroup (zombies are not). Reading also re-arms `POLLPRI`.
    /// An unreadable file counts as populated: the caller then goes on killing and waiting.
    pub fn populated(&self) -> bool {
        let mut buf = [0u8; 256];
        match self.events.read_at(&mut buf, 0) {
            Ok(n) => parse_populated(&String::from_utf8_lossy(&buf[..n])).unwrap_or(true),
            Err(_) => true,
        }
    }

    /// Removes the (empty) cgroup. The kernel may report it busy for a moment after the last
    /// process was reaped; a few tries, then it is left for the next start to reuse.
    pub fn remove(self) {
        remove_dir(&self.dir);
    }
}

/// Removes a cgroup directory, trying for a short while if the kernel still calls it busy.
pub fn remove_dir(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return,
            Err(err) if err.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(err) => {
                tracing::debug!(dir = %dir.display(), %err, "cannot remove the command's cgroup");
                return;
            }
        }
    }
}

/// Writes through an unseekable kernfs file in one `write` at offset 0.
trait WriteAtStart {
    fn write_all_at_start(self, buf: &[u8]) -> io::Result<()>;
}

impl WriteAtStart for &File {
    fn write_all_at_start(self, buf: &[u8]) -> io::Result<()> {
        let n = self.write_at(buf, 0)?;
        if n == buf.len() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, "short write"))
        }
    }
}

/// The `populated` field of `cgroup.events`.
pub fn parse_populated(text: &str) -> Option<bool> {
    text.lines()
        .find_map(|line| line.strip_prefix("populated "))
        .map(|value| value.trim() != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_line() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/a.service\n";
        assert_eq!(
            own_cgroup_v2(hybrid).as_deref(),
            Some("/system.slice/a.service")
        );
        assert_eq!(own_cgroup_v2("4:memory:/x\n"), None);
        assert_eq!(own_cgroup_v2("0::/\n").as_deref(), Some("/"));
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(info),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_owned()))
        );
        let spaced = "41 31 0:38 /a\\040b /mnt/c\\040g rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(spaced),
            Some((PathBuf::from("/mnt/c g"), "/a b".to_owned()))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn resolves_our_directory() {
        let point = Path::new("/sys/fs/cgroup");
        assert_eq!(
            resolve(point, "/", "/system.slice/a.service"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/a.service"))
        );
        assert_eq!(
            resolve(point, "/", "/"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A mount of a subtree (a container's view): paths below its root only.
        assert_eq!(
            resolve(point, "/machine.slice", "/machine.slice/x"),
            Some(PathBuf::from("/sys/fs/cgroup/x"))
        );
        assert_eq!(resolve(point, "/machine.slice", "/other"), None);
        assert_eq!(resolve(point, "/machine.slice", "/machine.sliced"), None);
    }

    #[test]
    fn reads_populated() {
        assert_eq!(parse_populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(parse_populated("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(parse_populated("frozen 0\n"), None);
    }
}
