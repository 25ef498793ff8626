//! The processes under one process, found by walking *down* from it through
//! `/proc/<pid>/task/<tid>/children`, so that the cost of finding a command's tree follows the size
//! of that tree and not the number of processes on the host (a stop used to read `/proc/*/stat`
//! for every process on the host, several times; with 2,000 idle processes a handover took 15
//! times longer).
//!
//! `children` lists the children of one *thread* (a child's parent is the thread that forked it),
//! so every thread of a process is read. The file exists when the kernel has
//! `CONFIG_PROC_CHILDREN`, which every mainstream distribution enables (CRIU needs it); where it is
//! missing this module falls back to one scan of `/proc`, and says so once in the log.
//!
//! A walk is a snapshot: a process may fork or exit while it runs. The callers make that harmless:
//! they walk again after every change they are told about (SIGCHLD, `cgroup.events`) until the
//! walk comes back empty, and the keeper signals pids it found right after the walk, with no
//! reaping in between (see `keeper`'s module docs on which pids may be signalled).

use std::io;
use std::sync::OnceLock;

use nix::unistd::Pid;

/// A process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: Pid,
    /// The state letter: `R`, `S`, `D`, `T`, `Z`, ...
    pub state: char,
    pub ppid: Pid,
    pub pgrp: Pid,
}

impl Stat {
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Reads `/proc/<pid>/stat`; `None` once the process is gone (reaped).
pub fn stat(pid: Pid) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `pid (comm) state ppid pgrp ...`; comm may contain spaces and parentheses, so the
/// fields after it are found from the last `)`.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let (head, tail) = stat.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut fields = tail.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Stat {
        pid: Pid::from_raw(pid),
        state,
        ppid: Pid::from_raw(ppid),
        pgrp: Pid::from_raw(pgrp),
    })
}

/// The direct children of `pid` (zombies included: they stay on the list until reaped). Empty
/// when the process is gone.
pub fn children(pid: Pid) -> Vec<Pid> {
    if !children_files() {
        return scan_children(pid);
    }
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        // A thread may exit between readdir and read: skip it.
        if let Ok(text) = std::fs::read_to_string(path) {
            found.extend(parse_children(&text));
        }
    }
    found
}

/// Every process under `root`, depth first, `root` excluded.
pub fn descendants(root: Pid) -> Vec<Pid> {
    let mut found = Vec::new();
    let mut todo = children(root);
    while let Some(pid) = todo.pop() {
        // A pid can show up twice only if it was re-parented in the middle of the walk.
        if pid == root || found.contains(&pid) {
            continue;
        }
        found.push(pid);
        todo.extend(children(pid));
    }
    found
}

/// Parses a `children` file: pids separated by spaces.
pub fn parse_children(text: &str) -> impl Iterator<Item = Pid> + '_ {
    text.split_ascii_whitespace()
        .filter_map(|s| s.parse().ok())
        .map(Pid::from_raw)
}

/// Whether this kernel has `/proc/<pid>/task/<tid>/children` (`CONFIG_PROC_CHILDREN`).
fn children_files() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        let me = nix::unistd::gettid();
        let present = std::path::Path::new(&format!("/proc/self/task/{me}/children")).exists();
        if !present {
            tracing::warn!(
                "this kernel has no /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN); \
                 finding the command's processes scans all of /proc instead"
            );
        }
        present
    })
}

/// The fallback for kernels without `children` files: one scan of every process.
fn scan_children(pid: Pid) -> Vec<Pid> {
    match scan_all() {
        Ok(all) => all
            .into_iter()
            .filter(|stat| stat.ppid == pid)
            .map(|stat| stat.pid)
            .collect(),
        Err(err) => {
            tracing::warn!(%err, "cannot read /proc");
            Vec::new()
        }
    }
}

fn scan_all() -> io::Result<Vec<Stat>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(stat) = stat(Pid::from_raw(pid)) {
            all.push(stat);
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_awkward_names() {
        let stat = "42 (a) b (c) d) S 7 42 42 0 -1 4194560 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                pid: Pid::from_raw(42),
                state: 'S',
                ppid: Pid::from_raw(7),
                pgrp: Pid::from_raw(42)
            })
        );
        assert!(parse_stat("9 (z) Z 1 9 9").unwrap().is_zombie());
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_children_files() {
        let pids: Vec<i32> = parse_children("12 345 6 \n").map(Pid::as_raw).collect();
        assert_eq!(pids, [12, 345, 6]);
        assert_eq!(parse_children("").count(), 0);
    }
}
