//! CPU seconds spent by the parts of a benchmark (this process, PostgreSQL, the broker),
//! read from /proc, so a report can say where a phase's time went on a shared machine.

use std::collections::BTreeMap;
use std::time::Instant;

/// A process's name and its `/proc/<pid>/stat` fields after it (pid (comm) state ppid …:
/// index 11 utime, 12 stime, 13 cutime, 14 cstime, in ticks).
fn stat_of(path: &std::path::Path) -> Option<(String, Vec<f64>)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<f64> = stat[close + 2..].split(' ').map(|f| f.parse().unwrap_or(0.0)).collect();
    (fields.len() > 14).then(|| (stat[open + 1..close].to_string(), fields))
}

/// CPU seconds process `pid` has used itself (user + system).
pub fn process_seconds(pid: u32) -> f64 {
    stat_of(std::path::Path::new(&format!("/proc/{pid}/stat"))).map_or(0.0, |(_, f)| (f[11] + f[12]) / 100.0)
}

/// CPU seconds used so far, by part, and when they were read.
pub struct CpuSnapshot {
    at: Instant,
    parts: BTreeMap<&'static str, f64>,
}

impl CpuSnapshot {
    pub fn now() -> Self {
        let tick = 100.0; // USER_HZ on Linux
        let mut parts = BTreeMap::new();
        let me = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Some((comm, fields)) = stat_of(&entry.path().join("stat")) else { continue };
            let (own, children) = (fields[11] + fields[12], fields[13] + fields[14]);
            let part = if name == me {
                "this process"
            } else if comm.starts_with("postgres") {
                "PostgreSQL"
            } else if comm.starts_with("tansu") {
                "broker"
            } else {
                continue;
            };
            // Exited backends count in the postmaster's children's time.
            *parts.entry(part).or_default() += (own + children) / tick;
        }
        Self { at: Instant::now(), parts }
    }

    /// CPU seconds `part` used since `self`.
    pub fn used(&self, part: &str) -> f64 {
        Self::now().parts.get(part).copied().unwrap_or(0.0) - self.parts.get(part).copied().unwrap_or(0.0)
    }

    /// "wall 2.1 s; CPU: this process 1.9 s, PostgreSQL 0.8 s, broker 1.1 s" since `self`.
    pub fn since(&self) -> String {
        let now = Self::now();
        let used: Vec<String> = now
            .parts
            .iter()
            .map(|(part, s)| format!("{part} {:.2} s", s - self.parts.get(part).copied().unwrap_or(0.0)))
            .collect();
        format!("wall {:.2} s; CPU: {}", self.at.elapsed().as_secs_f64(), used.join(", "))
    }
}
