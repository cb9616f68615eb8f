//! `amplog` processes a test starts: SIGKILLed when dropped (also when an assertion fails
//! first), or stopped with SIGTERM and a bounded wait.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Process(pub Option<Child>);

impl Process {
    /// `amplog {args}` with `env`, its standard error into `log`.
    pub fn amplog(args: &[&str], env: &[(&str, String)], log: &std::path::Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_amplog"));
        command.args(args).stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        Process(Some(command.spawn().unwrap()))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// SIGTERM, then a bounded wait for a clean exit.
    pub fn terminate(mut self) {
        let mut child = self.0.take().unwrap();
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "stopped cleanly: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback port free now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What every process of a sync world on Kafka is started with: its database, the test
/// credential key, the simulator (on loopback), the broker and the topics' prefix.
pub(crate) fn world_env(
    world: &amplog_simulator::testing::SyncWorld,
    kafka: &amplog_streams::KafkaConfig,
) -> Vec<(&'static str, String)> {
    use base64::Engine;
    vec![
        ("DATABASE_URL", world.db.url.clone()),
        (
            "AMPLOG_CREDENTIALS_KEY",
            base64::engine::general_purpose::STANDARD.encode(amplog_commands::testing::TEST_KEY),
        ),
        ("AMPLOG_PROVIDER_SIMULATOR_URL", world.sim.url()),
        ("AMPLOG_ALLOW_PRIVATE_NETWORKS", "true".into()),
        ("AMPLOG_KAFKA_BROKERS", kafka.brokers.clone()),
        ("AMPLOG_KAFKA_TOPIC_PREFIX", kafka.topic_prefix.clone()),
        ("AMPLOG_KAFKA_PARTITIONS", kafka.partitions.to_string()),
        // A dead member's partitions move after the session timeout (45 s by default).
        ("AMPLOG_KAFKA_PROPERTIES", "session.timeout.ms=6000,heartbeat.interval.ms=1000".into()),
    ]
}
