//! The command line: every command and its flags (clap), and what each runs. One module
//! per command group does the work: `serve` (the API, projects, keys), `sync` (workers,
//! the simulator, destinations), `streams` (Kafka), `audit` (history, verify, projections).

use crate::settings::{InProcess, InProcessMode, KafkaArgs, SimArgs, WorkerOptions};
use crate::{audit, config, demo, serve, streams, sync};
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "amplog", version, about = "Event-sourced backbone of a product-integration platform")]
pub struct Cli {
    /// PostgreSQL to use. Unset: amplog runs its own, in the data folder.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the embedded PostgreSQL and the generated credential key live.
    #[arg(long, env = "AMPLOG_DATA_DIR", global = true, default_value = ".amplog")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Where a worker, the relay, a projector or the scheduler serves /healthz, /readyz and
    /// its own /metrics (`serve` has them on its API port).
    #[arg(long, env = "AMPLOG_OPS_LISTEN", global = true)]
    pub ops_listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Cmd,
}

impl Cmd {
    /// Whether the command runs until stopped (then it serves the ops endpoints).
    pub fn runs_until_stopped(&self) -> bool {
        matches!(
            self,
            Cmd::Worker { .. } | Cmd::Relay | Cmd::Scheduler | Cmd::Projections { command: ProjectionsCmd::Run { .. } }
        )
    }
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Apply the database migrations.
    Migrate,
    /// Run a realistic scripted scenario through the command layer and print what it appended.
    Demo,
    /// The auditor's timeline of an installation: its events, its connection's and its
    /// operations', in log order.
    History {
        #[arg(long)]
        installation: uuid::Uuid,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Recompute the hash chains (of one installation's streams, or of the whole log) and
    /// report any break. Exits with status 1 when a chain is broken.
    Verify {
        #[arg(long)]
        installation: Option<uuid::Uuid>,
    },
    /// Serve the API: GraphQL at /graphql (WebSocket subscriptions at /graphql/ws), the
    /// audit export, /healthz, /readyz and /metrics. Stops gracefully on Ctrl-C or SIGTERM.
    Serve {
        /// Address to listen on [default: the config file's `listen`, else 127.0.0.1:8080].
        #[arg(long, env = "AMPLOG_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// A TOML file of server settings (listen, dev, limits); flags and variables win.
        #[arg(long, env = "AMPLOG_CONFIG")]
        config: Option<PathBuf>,
        /// Development mode: GraphiQL at GET /graphql and schema introspection.
        #[arg(long, env = "AMPLOG_DEV")]
        dev: bool,
        /// Run the read-model projector in this process (default: only on the embedded
        /// PostgreSQL; with DATABASE_URL run `amplog projections run` beside the API).
        #[arg(long, value_enum, default_value_t = InProcessMode::Auto)]
        projectors: InProcessMode,
        /// Run the sync workers and the scheduler in this process (default: only on the
        /// embedded PostgreSQL; otherwise run `amplog worker`).
        #[arg(long, value_enum, default_value_t = InProcessMode::Auto)]
        workers: InProcessMode,
        /// Also run the provider simulator and a webhook sink, with a demo project of three
        /// customers syncing from it (implies in-process workers).
        #[arg(long)]
        demo: bool,
    },
    /// Serve the provider simulator: a CRM-like API (OAuth2, paged objects, writes) with
    /// fault injection, for tests and demos.
    ProviderSim(SimArgs),
    /// Run sync workers (a Kafka consumer group when AMPLOG_KAFKA_BROKERS is set, else the
    /// in-process dispatch from the log) and the read scheduler, until Ctrl-C or SIGTERM.
    Worker {
        /// Jobs run at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Do not run the scheduler here.
        #[arg(long)]
        no_scheduler: bool,
        /// How long a worker's lease on an operation holds (renewed while it works); a
        /// dead worker's operation is taken over after it.
        #[arg(long, default_value_t = 10)]
        lease_secs: u64,
    },
    /// Run the read scheduler and the notifier (lifecycle notifications, pushed changes),
    /// each one leader at a time, until Ctrl-C or SIGTERM.
    Scheduler,
    /// Destinations: a project's webhook endpoints that receive read results.
    Destinations {
        #[command(subcommand)]
        command: DestinationsCmd,
    },
    /// Operations: retry a failed one (dispatched again; a read resumes from its last page).
    Operations {
        #[command(subcommand)]
        command: OperationsCmd,
    },
    /// Dead letters (operations that failed after all their attempts): list, replay.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCmd,
    },
    /// Organizations: above projects.
    Orgs {
        #[command(subcommand)]
        command: OrgsCmd,
    },
    /// Projects (tenants).
    Projects {
        #[command(subcommand)]
        command: ProjectsCmd,
    },
    /// Admin keys (a deployment operator's, allowed in every project with `X-Admin-Key`):
    /// create (printed once), revoke.
    AdminKeys {
        #[command(subcommand)]
        command: AdminKeysCmd,
    },
    /// API keys: create (printed once), list, revoke.
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
    },
    /// The read-model projector: run it, see where it stands, rebuild, or print metrics.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCmd,
    },
    /// Relay the log to Kafka (AMPLOG_KAFKA_BROKERS): every event to its aggregate's topic,
    /// every dispatched job to the jobs topic; one leader at a time. Stops on Ctrl-C/SIGTERM.
    Relay,
    /// Where the relay stands: checkpoint, lag, leader.
    RelayStatus,
    /// Print a Kafka topic's messages, one JSON object per line.
    Tail {
        /// The topic, e.g. amplog.installation.v1.
        #[arg(long)]
        topic: String,
        /// Start at the oldest retained message instead of new ones.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many messages.
        #[arg(long)]
        max: Option<u64>,
    },
    /// Write the JSON Schemas of every published event type into a folder.
    Schemas {
        #[arg(long, default_value = "streams/schemas")]
        out: PathBuf,
    },
    /// Print the GraphQL schema (`--sdl`: as SDL, the form committed in gateways/api/schema.graphql).
    Schema {
        #[arg(long)]
        sdl: bool,
    },
}

#[derive(Subcommand)]
pub enum DestinationsCmd {
    /// Create (or re-point) a destination; prints its signing secret once.
    Create {
        #[arg(long)]
        project: uuid::Uuid,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long)]
        url: String,
    },
    /// A project's destinations (names and URLs, never secrets).
    List {
        #[arg(long)]
        project: uuid::Uuid,
    },
}

#[derive(Subcommand)]
pub enum OperationsCmd {
    /// Retry a failed operation of the project.
    Retry {
        #[arg(long)]
        project: uuid::Uuid,
        id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
pub enum DeadLettersCmd {
    /// The project's dead letters, newest first, one JSON object per line.
    List {
        #[arg(long)]
        project: uuid::Uuid,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        first: i64,
    },
    /// Replay a dead letter: it runs again from its last recorded page.
    Replay {
        #[arg(long)]
        project: uuid::Uuid,
        id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
pub enum OrgsCmd {
    /// Create an organization; prints its id.
    Create { name: String },
}

#[derive(Subcommand)]
pub enum ProjectsCmd {
    /// Create a project (in an organization with `--org`); prints its id.
    Create {
        name: String,
        #[arg(long)]
        org: Option<uuid::Uuid>,
    },
}

#[derive(Subcommand)]
pub enum AdminKeysCmd {
    /// Create an admin key and print it (the only time it is shown).
    Create {
        #[arg(long)]
        label: Option<String>,
    },
    /// Revoke an admin key by its id.
    Revoke { id: uuid::Uuid },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create a key for a project and print it (the only time it is shown).
    Create {
        #[arg(long)]
        project: uuid::Uuid,
        #[arg(long, value_parser = ["read", "write", "admin"], default_value = "read")]
        scope: String,
        /// A note to recognise the key by.
        #[arg(long)]
        label: Option<String>,
    },
    /// List a project's keys (ids, scopes, dates; never the keys).
    List {
        #[arg(long)]
        project: uuid::Uuid,
    },
    /// Revoke a key by its id: refused everywhere within a second.
    Revoke { id: uuid::Uuid },
}

#[derive(Subcommand)]
pub enum ProjectionsCmd {
    /// Project the log into the read models until interrupted (one leader at a time).
    Run {
        /// Events per batch.
        #[arg(long, default_value_t = 1000)]
        batch_size: i64,
    },
    /// Position, lag and leader of each projector.
    Status,
    /// Rebuild the read models from the whole log into shadow tables and swap them in.
    Rebuild {
        /// The projector to rebuild (there is one: read_models).
        #[arg(default_value = amplog_projections::READ_MODELS)]
        name: String,
    },
    /// Print the Prometheus metrics derived from the read models.
    Metrics,
}

/// Runs a command that needs no database; `None` when it needs one.
pub async fn run_offline(cli: &Cli) -> Option<Result<i32>> {
    match &cli.command {
        Cmd::Schemas { out } => Some(streams::schemas(out)),
        Cmd::Schema { .. } => {
            print!("{}", amplog_api::graphql::sdl());
            Some(Ok(0))
        }
        Cmd::ProviderSim(args) => Some(sync::provider_sim(args).await),
        Cmd::Tail { topic, from_beginning, max } => {
            let options =
                amplog_streams::tail::TailOptions { topic: topic.clone(), from_beginning: *from_beginning, max: *max };
            Some(streams::tail(&cli.kafka, options).await)
        }
        _ => None,
    }
}

/// Runs a command on the database.
pub async fn run(app: &mut config::App, command: Cmd, kafka: &KafkaArgs) -> Result<i32> {
    match command {
        Cmd::Relay => streams::relay(app, kafka).await,
        Cmd::RelayStatus => {
            let st = amplog_projections::status(&app.pool, amplog_streams::RELAY).await?;
            println!("{}", serde_json::to_string_pretty(&st)?);
            Ok(0)
        }
        Cmd::Schemas { .. } | Cmd::Schema { .. } | Cmd::Tail { .. } | Cmd::ProviderSim(_) => {
            unreachable!("handled before connecting")
        }
        Cmd::Worker { concurrency, no_scheduler, lease_secs } => {
            let lease = std::time::Duration::from_secs(lease_secs.max(1));
            sync::worker(app, kafka, WorkerOptions { concurrency, lease }, !no_scheduler).await
        }
        Cmd::Scheduler => sync::scheduler(app).await,
        Cmd::Destinations { command } => match command {
            DestinationsCmd::Create { project, name, url } => sync::create_destination(app, project, &name, &url).await,
            DestinationsCmd::List { project } => sync::list_destinations(app, project).await,
        },
        Cmd::Operations { command: OperationsCmd::Retry { project, id } } => {
            sync::retry_operation(app, project, id).await
        }
        Cmd::DeadLetters { command } => match command {
            DeadLettersCmd::List { project, first } => sync::list_dead_letters(app, project, first).await,
            DeadLettersCmd::Replay { project, id } => sync::replay_dead_letter(app, project, id).await,
        },
        Cmd::Migrate => {
            println!("migrations applied; schema is current");
            Ok(0)
        }
        Cmd::Demo => {
            let service = app.service()?;
            demo::run(&service).await?;
            Ok(0)
        }
        Cmd::History { installation, json } => audit::history(app, installation, json).await,
        Cmd::Projections { command } => audit::projections(app, command).await,
        Cmd::Serve { listen, config, dev, projectors, workers, demo } => {
            let config = crate::settings::server_config(config.as_deref(), listen, dev)?;
            serve::run(app, config, InProcess { projectors, workers, demo }, kafka).await
        }
        Cmd::Orgs { command: OrgsCmd::Create { name } } => serve::create_org(app, &name).await,
        Cmd::Projects { command: ProjectsCmd::Create { name, org } } => serve::create_project(app, &name, org).await,
        Cmd::AdminKeys { command } => match command {
            AdminKeysCmd::Create { label } => serve::create_admin_key(app, label.as_deref()).await,
            AdminKeysCmd::Revoke { id } => serve::revoke_admin_key(app, id).await,
        },
        Cmd::Keys { command } => match command {
            KeysCmd::Create { project, scope, label } => {
                serve::create_key(app, project, &scope, label.as_deref()).await
            }
            KeysCmd::List { project } => serve::list_keys(app, project).await,
            KeysCmd::Revoke { id } => serve::revoke_key(app, id).await,
        },
        Cmd::Verify { installation } => audit::verify(app, installation).await,
    }
}
