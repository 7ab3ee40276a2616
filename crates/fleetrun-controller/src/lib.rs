//! The fleetrun controller: the bk-job-compatible HTTP API, the job engine, and the QUIC gateway
//! that agents connect to, over one store.
//!
//! ```text
//! client --HTTP--> api --> store (job created) --> engine --QUIC stream per task--> agent
//!                                                    ^                                 |
//!                                                    +------ output, result -----------+
//! ```

pub mod api;
pub mod audit;
pub mod backup;
pub mod callback;
pub mod check;
pub mod cluster;
pub mod config;
pub mod console;
pub mod content;
pub mod dangerous;
pub mod dist;
pub mod engine;
pub mod enroll;
pub mod gateway;
pub mod host_run;
pub mod inventory;
pub mod metrics;
pub mod reload;
pub mod retention;
pub mod rolling;
pub mod secret_source;
pub mod secrets;
pub mod status;
pub mod tls_api;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use fleetrun_net::Timing;
use fleetrun_store::Store;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// State shared by the API handlers.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the controller started with. Its `apps` are the start-up ones, which a
    /// reload does not change: read the apps in force through [`Shared::apps`].
    pub config: Arc<Config>,
    /// The apps allowed to call the API; replaced on reload.
    pub apps: Arc<reload::Apps>,
    pub store: Store,
    pub engine: engine::Engine,
    pub agents: gateway::Agents,
    /// Businesses, topology, hosts, groups and accounts.
    pub inventory: Arc<inventory::InventoryState>,
    /// Seals sensitive parameters before they are stored.
    pub cipher: secrets::ParamCipher,
    /// Cancelled when the controller stops; long-lived responses end on it.
    pub shutdown: CancellationToken,
    /// Whether the QUIC listener agents connect to is accepting (for `/readyz`).
    pub agent_listener_up: Arc<std::sync::atomic::AtomicBool>,
    /// Where state-changing API calls are recorded.
    pub audit: audit::AuditLog,
    /// The dangerous-command rules scripts are checked against.
    pub dangerous_rules: dangerous::DangerousRules,
    /// Enrollment's pin and addresses, when `[enroll]` is configured.
    pub enroll: Option<enroll::EnrollSettings>,
    /// File chunks and local uploads for file transfers.
    pub content: Arc<content::ContentStore>,
}

/// A started controller.
#[derive(Debug)]
pub struct Controller {
    pub http_addr: SocketAddr,
    pub agent_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    store: Store,
    inventory: Arc<inventory::InventoryState>,
    /// The API's TLS configuration, read again on reload.
    api_tls: Option<Arc<tls_api::ApiTls>>,
    apps: Arc<reload::Apps>,
    /// The configuration the controller started with, to name what a reload could not apply.
    config: Arc<Config>,
    /// The gateway's endpoint, whose certificate a reload swaps.
    endpoint: quinn::Endpoint,
    enroller: Option<Arc<enroll::Enroller>>,
    /// The audit trail, closed once the API has stopped.
    audit: audit::AuditLog,
    /// The audit trail's task.
    audit_tasks: tokio::task::JoinSet<()>,
}

/// Unix time in milliseconds, as bk-job reports times.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Controller {
    /// Opens the store, takes up the jobs a previous run left running on agents that own their
    /// tasks, ends the other unfinished ones, and starts serving.
    pub async fn start(mut config: Config) -> anyhow::Result<Self> {
        // The store creates the database's directory, readable by this user only.
        // Without `[metrics]` nothing records: the facade's calls cost nothing.
        if config.metrics.is_some() {
            metrics::install();
        }
        let store = match &config.cluster {
            Some(cluster) => Store::open_as(&config.database, &cluster.name).await,
            None => Store::open_database(&config.database).await,
        }
        .with_context(|| format!("opening database {}", config.database))?;
        let membership =
            cluster::Membership::new(store.clone(), &config.database, config.cluster.as_ref());
        // Nobody is connected yet; with other controllers alive, their agents are.
        let others_alive = match &membership {
            Some(membership) => membership.others_alive().await?,
            None => false,
        };
        if !others_alive {
            store.set_all_offline().await?;
        }
        // Sharing the database, the jobs taken up are those whose lease this controller takes:
        // its own from before a restart, and those of controllers that stopped renewing.
        let taken = match &membership {
            Some(membership) => Some(membership.take_orphans(true).await?),
            None => None,
        };
        let (resumable, ended) = take_up_unfinished(&store, taken.as_deref()).await?;
        if let Some(membership) = &membership {
            for job in &ended {
                membership.release_ended(*job).await;
            }
        }

        let cipher = secrets::ParamCipher::load_or_create(&config.param_key_file())?;
        let audit_key_file = config.audit_key_file();
        let audit_anchor_file = config.audit_anchor_file();
        // The audit trail's task ends at `AuditLog::close`, after the API: it is not among the
        // servers.
        let mut audit_tasks = tokio::task::JoinSet::new();

        let timing = Timing::default();
        let endpoint = fleetrun_net::server_endpoint(&config.tls, config.agent_listen, timing)?;
        let agent_addr = endpoint.local_addr()?;
        let agent_endpoint = endpoint.clone();
        let api_tls = match &config.api.tls {
            Some(files) => Some(Arc::new(
                tls_api::ApiTls::load(files).map_err(|e| anyhow::anyhow!(e))?,
            )),
            None => {
                if !config.http_listen_is_loopback() {
                    anyhow::ensure!(
                        config.api.allow_plain_http,
                        "http_listen {} is not a loopback address and [api] tls is not set: \
                         credentials and scripts would cross the network in clear; configure \
                         [api] tls, or set [api] allow_plain_http = true behind a proxy that \
                         terminates TLS",
                        config.http_listen
                    );
                    tracing::warn!(
                        http_listen = %config.http_listen,
                        "the API serves plain HTTP on a non-loopback address ([api] \
                         allow_plain_http): credentials and scripts cross the network in clear"
                    );
                }
                None
            }
        };
        let listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("binding HTTP {}", config.http_listen))?;
        let http_addr = listener.local_addr()?;
        // The address actually bound (port 0 picks one): callback URLs must not point at it.
        config.http_listen = http_addr;
        // From here on one configuration is shared, never copied.
        let config = Arc::new(config);
        // Loaded here, after both listeners are bound, because the shared Arc<Config> it keeps
        // exists only from here. The cost: API clients that connect meanwhile wait in the listen
        // backlog (and agents' handshakes queue) until a large import has loaded.
        let inventory = Arc::new(inventory::InventoryState::load(&config, store.clone()).await?);

        let agents = gateway::Agents::default();
        agents.set_revoked(
            store
                .revoked_agents()
                .await?
                .into_iter()
                .map(|r| r.agent_id),
        );
        let param_cipher = Arc::new(secrets::ParamCipher::load_or_create(
            &config.param_key_file(),
        )?);
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let callbacks = callback::start(store.clone(), &config, shutdown.clone(), &mut tasks)?;
        let engine = engine::Engine::new(
            store.clone(),
            agents.clone(),
            config.limits.output_limit,
            Duration::from_secs(config.limits.agent_grace_secs),
            callbacks,
        )
        .with_membership(membership.clone())
        .with_cipher(param_cipher);
        tasks.spawn(engine.save_checkpoints(shutdown.clone()));
        if let Some(membership) = &membership {
            let scheme = if config.api.tls.is_some() {
                "https"
            } else {
                "http"
            };
            membership
                .register(&format!("{scheme}://{http_addr}"), &agent_addr.to_string())
                .await?;
            tasks.spawn(membership.clone().run(engine.clone(), shutdown.clone()));
        }
        for job in resumable {
            tracing::info!(
                job = job.job_instance_id,
                hosts = job.hosts.len(),
                "taking up a job that ran when the controller stopped"
            );
            engine.resume(job);
        }
        // The CA is loaded before anything is served: a controller configured to enroll hosts
        // without its CA does not start.
        let enrollment = match &config.enroll {
            Some(enroll_config) => {
                let files = enroll_config
                    .ca_files(&config.database)
                    .map_err(anyhow::Error::msg)?;
                let ca = enroll::ControllerCa::load(&files).context(
                    "loading the enrollment CA (make it with `fleetrun-controller ca init \
                     --config FILE`, or import one with --import-cert and --import-key)",
                )?;
                ca.check_gateway_trusts(&files.cert, &config.tls.ca)
                    .map_err(anyhow::Error::msg)?;
                // The same port number as the QUIC gateway, over TCP.
                let listen = SocketAddr::new(config.agent_listen.ip(), agent_addr.port());
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the enrollment listener on TCP {listen}"))?;
                let settings = enroll::EnrollSettings::new(
                    &config,
                    enroll_config,
                    ca.pin(),
                    agent_addr,
                    http_addr,
                );
                Some((settings, Arc::new(ca), listener))
            }
            None => None,
        };
        let shutdown_gateway = shutdown.clone();
        let gateway = gateway::Gateway {
            agents: agents.clone(),
            store: store.clone(),
            heartbeat: Duration::from_secs(config.limits.heartbeat_secs),
            inventory: inventory.clone(),
            policy: config.agents.clone(),
            engine: engine.clone(),
            renewal: match (&enrollment, &config.enroll) {
                (Some((_, ca, _)), Some(enroll_config)) => Some(enroll::Renewal::new(
                    ca.clone(),
                    Duration::from_secs(enroll_config.cert_lifetime_secs),
                )),
                _ => None,
            },
        };
        let agent_listener_up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let listening = agent_listener_up.clone();
        tasks.spawn(async move {
            gateway.serve(endpoint, shutdown_gateway).await;
            listening.store(false, std::sync::atomic::Ordering::Relaxed);
        });

        let content_dir = config.content_dir();
        let content = Arc::new(
            content::ContentStore::open(&content_dir, config.files.max_bytes).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the content store {}: {e}",
                    content_dir.display()
                )
            })?,
        );
        tasks.spawn(content::sweep_periodically(
            content.clone(),
            shutdown.clone(),
        ));
        let apps = Arc::new(reload::Apps::new(config.clone()));
        let shared = Arc::new(Shared {
            apps: apps.clone(),
            config: config.clone(),
            store: store.clone(),
            engine,
            agents,
            inventory: inventory.clone(),
            cipher,
            shutdown: shutdown.clone(),
            agent_listener_up,
            audit: audit::open(
                store.clone(),
                &audit_key_file,
                &audit_anchor_file,
                &mut audit_tasks,
            )
            .await?,
            dangerous_rules: dangerous::DangerousRules::load(store.clone()).await?,
            enroll: enrollment.as_ref().map(|(settings, ..)| settings.clone()),
            content,
        });
        let enroller = match enrollment {
            Some((settings, ca, listener)) => {
                let enroller =
                    Arc::new(enroll::Enroller::new(shared.clone(), settings.config, ca)?);
                tracing::info!(pin = %settings.pin, "enrollment open");
                tasks.spawn(enroller.clone().serve(listener, shutdown.clone()));
                Some(enroller)
            }
            None => None,
        };
        tasks.spawn(retention::run(
            store.clone(),
            shared.config.retention.clone(),
            shutdown.clone(),
        ));
        if shared.engine.membership().is_some() {
            tasks.spawn(cluster::follow_trust(shared.clone(), shutdown.clone()));
            tasks.spawn(cluster::follow_hosts(shared.clone(), shutdown.clone()));
        }
        let limits = shared.config.limits.clone();
        let audit = shared.audit.clone();
        let app = api::router(shared);
        tasks.spawn(api::serve(
            listener,
            app,
            limits,
            api_tls.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%http_addr, %agent_addr, "controller started");
        Ok(Self {
            http_addr,
            agent_addr,
            shutdown,
            tasks,
            store,
            inventory,
            api_tls,
            apps,
            config,
            endpoint: agent_endpoint,
            enroller,
            audit,
            audit_tasks,
        })
    }

    /// Reads the configuration file again (on SIGHUP): the apps are replaced for the next
    /// request, and what else changed is logged as waiting for a restart. A file that does not
    /// load changes nothing.
    pub fn reload_config(
        &self,
        path: &std::path::Path,
    ) -> Result<Vec<String>, config::ConfigError> {
        let new = Arc::new(Config::load(path)?);
        Ok(reload::apply(&self.apps, &self.config, new))
    }

    /// Reads the API's certificate and key again (on SIGHUP); whether the certificate changed.
    /// Files that do not load leave the ones in force.
    pub fn reload_api_tls(&self) -> Result<bool, String> {
        match &self.api_tls {
            Some(tls) => tls.reload(),
            None => Ok(false),
        }
    }

    /// Reads the gateway's certificate, key and CA bundle again (on SIGHUP): new connections and
    /// enrollments take them, connected agents stay. Files that do not load leave the ones in
    /// force.
    pub fn reload_agent_tls(&self) -> Result<(), String> {
        let config = fleetrun_net::quinn_server_config(&self.config.tls, Timing::default())
            .map_err(|e| e.to_string())?;
        if let Some(enroller) = &self.enroller {
            enroller.reload_tls().map_err(|e| format!("{e:#}"))?;
        }
        self.endpoint.set_server_config(Some(config));
        Ok(())
    }

    /// Imports the inventory file again (on SIGHUP) if it changed since it was last imported; an
    /// invalid file changes nothing.
    pub async fn reload_inventory(
        &self,
    ) -> Result<fleetrun_store::RevisionInfo, inventory::InventoryLoadError> {
        let inventory = self.inventory.clone();
        // Run to the end whatever happens to the caller: a stored revision is the one in force.
        tokio::spawn(async move { inventory.reload(inventory::Reimport::IfChanged).await })
            .await
            .map_err(|e| inventory::InventoryLoadError::Config(format!("reload failed: {e}")))?
            .map(|reloaded| reloaded.revision)
    }

    /// Stops accepting work, closes agent connections, and commits what is queued, each within a
    /// deadline: a database that refuses writes must not keep the controller from stopping.
    /// Returns false when results were left unwritten (the log says which and why).
    pub async fn shutdown(mut self) -> bool {
        self.shutdown.cancel();
        // One deadline for the whole stop: with the database refusing writes, the audit trail's
        // close and the store's flush both wait on the same writer, and phases with a deadline
        // each would add up.
        let deadline = tokio::time::Instant::now() + STOP_DEADLINE;
        let drained = tokio::time::timeout_at(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "the API and the gateway did not stop within {STOP_DEADLINE:?}; stopping them"
            );
            self.tasks.shutdown().await;
        }
        // The API has stopped: what it queued, and the count of refusals not yet recorded, is
        // committed before the audit trail's task ends (handles held elsewhere, by the enroller, do not
        // keep it waiting).
        let closed = tokio::time::timeout_at(deadline, async {
            self.audit.close().await;
            while self.audit_tasks.join_next().await.is_some() {}
        })
        .await;
        if closed.is_err() {
            tracing::error!(
                "the audit trail did not commit its last entries within {STOP_DEADLINE:?}"
            );
            self.audit_tasks.shutdown().await;
        }
        match tokio::time::timeout_at(deadline, self.store.flush()).await {
            // A flush counts writes given up during an outage as done (nothing will commit
            // them): they were left unwritten all the same, and the stop says so.
            Ok(Ok(())) => match self.store.health().lost {
                0 => true,
                lost => {
                    tracing::error!(
                        lost,
                        "stopping after the database refused writes for so long that {lost} \
                         results were given up: they are missing from the database"
                    );
                    false
                }
            },
            Ok(Err(e)) => {
                tracing::error!("final store flush failed: {e}");
                false
            }
            Err(_) => {
                let health = self.store.health();
                tracing::error!(
                    writes = health.pending,
                    output_bytes = health.pending_output_bytes,
                    lost_before = health.lost,
                    error = health.write_error.as_deref().unwrap_or("none"),
                    "stopping with results the database did not take within {STOP_DEADLINE:?}: \
                     these writes (host statuses and output) are lost; the jobs they belong to \
                     are ended as interrupted at the next start"
                );
                false
            }
        }
    }
}

/// Takes up the unfinished jobs (among `only`, when given: the jobs whose lease this controller
/// took), as a controller does at start: jobs with a task out on an agent that owns it, and
/// rolling jobs that were running, are returned for the engine to resume; a rolling job waiting
/// for a confirmation stays as it is; the others end here, their results unknown (returned
/// second).
pub(crate) async fn take_up_unfinished(
    store: &Store,
    only: Option<&[i64]>,
) -> anyhow::Result<(Vec<fleetrun_store::ResumableJob>, Vec<i64>)> {
    // Jobs with a task out on an agent that owns it are taken up again once the engine runs;
    // so is every rolling job that was running (between batches, nothing may be out): its
    // later batches have not run and must not end unknown. The others end here, their
    // results unknown.
    let rolling = store
        .rolling_jobs_in(&[status::job::RUNNING, status::job::TERMINATING])
        .await?;
    let resumable: Vec<fleetrun_store::ResumableJob> = store
        .resumable_jobs_among(
            only,
            status::job::UNFINISHED,
            status::host::UNFINISHED,
            status::host::SUCCESS,
        )
        .await?
        .into_iter()
        .filter(|job| {
            rolling.contains(&job.job_instance_id)
                || job
                    .hosts
                    .iter()
                    .any(|h| h.checkpoint.is_some() || h.handed_to.is_some())
        })
        .collect();
    // A rolling job waiting for a confirmation has nothing out on an agent: it stays as it
    // is, for an operator to go on with (engine/rolling.rs).
    let paused = store.rolling_jobs_in(&[status::job::WAITING_USER]).await?;
    let resumable: Vec<_> = resumable
        .into_iter()
        .filter(|job| !paused.contains(&job.job_instance_id))
        .collect();
    let mut keep: Vec<i64> = resumable.iter().map(|j| j.job_instance_id).collect();
    keep.extend(&paused);
    let ended = store
        .end_interrupted_jobs_among(
            only,
            &keep,
            status::host::AGENT_ABNORMAL,
            "the controller stopped while this task ran; its result is unknown",
            status::job::FAILED,
            status::host::UNFINISHED,
            status::job::UNFINISHED,
            now_ms(),
        )
        .await?;
    if !ended.is_empty() {
        tracing::warn!(jobs = ?ended, "ended jobs left unfinished by the previous run");
    }
    Ok((resumable, ended))
}

/// How long a stop waits, all told, for the servers to end, then for the audit trail and the
/// store to commit what is queued.
const STOP_DEADLINE: Duration = Duration::from_secs(8);
