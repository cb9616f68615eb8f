//! Throwaway PostgreSQL clusters of a test's own (a primary, a streaming standby), for
//! the tests that kill, promote or cut one off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// PostgreSQL's server binaries: `AMPLOG_TEST_PG_BIN` (scripts/test sets it), initdb's
/// folder on PATH, or the newest `/usr/lib/postgresql/*/bin`.
fn pg_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("AMPLOG_TEST_PG_BIN") {
        return bin.into();
    }
    let on_path = Command::new("sh").args(["-c", "readlink -f \"$(command -v initdb)\""]).output().unwrap();
    let initdb = String::from_utf8_lossy(&on_path.stdout).trim().to_string();
    if !initdb.is_empty() {
        return Path::new(&initdb).parent().unwrap().to_path_buf();
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries")
        .map(|e| e.unwrap().path().join("bin"))
        .collect();
    found.sort_by_key(|p| p.parent().unwrap().file_name().unwrap().to_string_lossy().parse::<u32>().unwrap_or(0));
    found.pop().expect("a PostgreSQL version")
}

fn root() -> bool {
    String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim() == "0"
}

/// A throwaway cluster on a loopback port, removed when dropped.
pub(crate) struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let binary = self.bin.join(program);
        match root() {
            // PostgreSQL refuses to run as root.
            true => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(binary);
                command
            }
            false => Command::new(binary),
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self.command(program).args(args).stdout(Stdio::null()).output().unwrap();
        assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }

    fn new_dir() -> (PathBuf, u16) {
        let dir = tempfile::Builder::new().prefix("amplog-failover.").tempdir_in("/tmp").unwrap().keep();
        if root() {
            let status = Command::new("chown").arg("postgres:").arg(&dir).status().unwrap();
            assert!(status.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        (dir, port)
    }

    fn start(&self, extra: &str) {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        let settings = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=200 -c fsync=off {extra}",
            self.port,
            self.dir.display()
        );
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-o", &settings, "start"],
        );
    }

    /// A primary (`synchronous` once its standby streams).
    pub fn primary() -> Self {
        Self::primary_on("127.0.0.1", None)
    }

    /// A primary listening on `listen` (comma-separated addresses), trusting `network` too.
    pub fn primary_on(listen: &str, network: Option<&str>) -> Self {
        let (dir, port) = Self::new_dir();
        let cluster = Cluster { dir, port, bin: pg_bin() };
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
        );
        if let Some(network) = network {
            use std::io::Write;
            let mut hba = std::fs::OpenOptions::new().append(true).open(data.join("pg_hba.conf")).unwrap();
            writeln!(hba, "host all all {network} trust").unwrap();
        }
        cluster.start(&format!("-c listen_addresses={listen}"));
        cluster
    }

    /// A streaming standby of `primary`, connected as `standby`.
    pub fn standby_of(primary: &Cluster) -> Self {
        let (dir, port) = Self::new_dir();
        let cluster = Cluster { dir, port, bin: pg_bin() };
        let data = cluster.dir.join("data");
        let source = format!("host=127.0.0.1 port={} user=postgres application_name=standby", primary.port);
        cluster.run(
            "pg_basebackup",
            &["-d", &source, "-D", data.to_str().unwrap(), "-X", "stream", "-R", "-c", "fast", "--no-sync"],
        );
        cluster.start("");
        cluster
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// SIGKILL to the postmaster and every backend.
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_string();
        Command::new("pkill").args(["-KILL", "-P", &pid]).status().unwrap();
        Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    }

    /// An immediate stop (no checkpoint: a crash's recovery) and a start on the same port.
    pub fn restart(&self) {
        let data = self.dir.join("data");
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        self.start("");
    }

    pub fn promote(&self) {
        self.run("pg_ctl", &["-D", self.dir.join("data").to_str().unwrap(), "-w", "promote"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.command("pg_ctl").args(["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
