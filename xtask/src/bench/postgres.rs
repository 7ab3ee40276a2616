//! PostgreSQL beside SQLite, measured in one run by one method. Three clusters in turn, each
//! with 10,000 swarm agents (EMULATED executor: no fork) and a database of its own: one
//! controller on SQLite, one on PostgreSQL, and two controllers sharing PostgreSQL with the
//! swarm's agents spread over both and the jobs submitted to the first, so that half of every
//! job's hosts are reached through the other. On each:
//! - a job to all 10,000 hosts, accept -> all final, p50/p99 (target <= 1.5 s on PostgreSQL,
//!   issue #13);
//! - on one controller, single-host job throughput as the `overhead` group measures it (16 in
//!   flight on 4 of the swarm's hosts, before the others connect);
//! - the rows and bytes the fan-outs left in each table, per host-run: `pg_total_relation_size`
//!   after `VACUUM` on PostgreSQL, the pages `dbstat` counts on SQLite.
//!
//! The server is `FLEETRUN_BENCH_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`); the
//! databases made on it are dropped at the end.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use fleetrun_store::scratch::ScratchDatabase;
use fleetrun_testkit::cluster::{Cluster, ClusterOptions};
use sqlx::{ConnectOptions as _, Connection as _};

use super::{
    Ctx,
    jobs::{Api, Stages, Timed, quantile},
    report::Figure,
    swarm::{PREFIX, SwarmProcess, stage_profile},
    sys,
};

/// The environment variable naming the PostgreSQL server.
pub const SERVER_VARIABLE: &str = "FLEETRUN_BENCH_POSTGRES";
const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// Hosts of the fan-out.
const HOSTS: usize = 10_000;
/// Issue #13: accept -> all final within 1.5 s on this machine, with one controller or two.
const TARGET_SECS: f64 = 1.5;
/// Hosts the single-host jobs go to, one each, and jobs in flight: as the `overhead` group.
const THROUGHPUT_HOSTS: usize = 4;
const IN_FLIGHT: usize = 16;
/// Polling interval while following a job: tight, so the figure is the controllers' time.
const POLL: Duration = Duration::from_millis(2);

/// The database and controllers of one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Sqlite,
    Postgres { controllers: usize },
}

impl Setup {
    fn controllers(self) -> usize {
        match self {
            Self::Sqlite => 1,
            Self::Postgres { controllers } => controllers,
        }
    }

    /// The part of its figures' names.
    fn key(self) -> String {
        match self {
            Self::Sqlite => "sqlite".into(),
            Self::Postgres { controllers } => format!("{controllers}c"),
        }
    }

    fn words(self) -> &'static str {
        match self {
            Self::Sqlite => "one controller on SQLite",
            Self::Postgres { controllers: 1 } => "one controller on PostgreSQL",
            Self::Postgres { .. } => "two controllers sharing PostgreSQL",
        }
    }
}

/// What one cluster measured.
struct Measured {
    setup: Setup,
    timed: Vec<Timed>,
    stages: Vec<Stages>,
    /// CPU seconds per run, every controller's together, and per controller.
    controller_cpu: Vec<Vec<f64>>,
    /// Single-host jobs per second (one controller only).
    jobs_per_sec: Option<f64>,
    /// What the fan-outs left in the database, per host-run.
    costs: Vec<TableCost>,
    total: TableCost,
    /// Agents connected to each controller (several controllers).
    spread: Vec<(String, i64)>,
}

/// The PostgreSQL server `FLEETRUN_BENCH_POSTGRES` names (`value`), else the local one.
fn server_from(value: Option<String>) -> Result<String> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(DEFAULT_SERVER.to_owned()),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(url),
        Some(other) => bail!("{SERVER_VARIABLE}={other:?}: expected a postgres:// URL"),
    }
}

/// Connects once: a server that is not there fails the group with a message saying which.
async fn probe(server: &str) -> Result<()> {
    let conn = sqlx::PgConnection::connect(server).await.map_err(|e| {
        anyhow!(
            "PostgreSQL server {server} not reachable ({e}); start it or name another with \
             {SERVER_VARIABLE}=postgres://…"
        )
    })?;
    conn.close().await?;
    Ok(())
}

pub async fn run(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let server = server_from(std::env::var(SERVER_VARIABLE).ok())?;
    // Before the SQLite cluster takes its minutes.
    probe(&server).await?;
    let sqlite = measure_setup(ctx, Setup::Sqlite, &server).await?;
    push_fanout(figures, &sqlite);
    push_footprint(figures, &sqlite, true);
    let one = measure_setup(ctx, Setup::Postgres { controllers: 1 }, &server).await?;
    push_fanout(figures, &one);
    push_throughput(figures, &sqlite, &one);
    push_footprint(figures, &one, true);
    let two = measure_setup(ctx, Setup::Postgres { controllers: 2 }, &server).await?;
    push_fanout(figures, &two);
    push_footprint(figures, &two, false);
    Ok(())
}

/// Starts the cluster of `setup` (and its database), measures, stops it.
async fn measure_setup(ctx: &Ctx, setup: Setup, server: &str) -> Result<Measured> {
    let dir = ctx.work.join(format!("postgres-{}", setup.key()));
    let _ = std::fs::remove_dir_all(&dir);
    let scratch = match setup {
        Setup::Sqlite => None,
        Setup::Postgres { .. } => Some(
            ScratchDatabase::create(server, "fleetrun_bench")
                .await
                .map_err(|e| anyhow!("creating a database on {server}: {e}"))?,
        ),
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        agents: 0,
        dir: dir.clone(),
        release: true,
        // Virtual agents report made-up addresses, all connecting from this machine.
        trust_reported_ip_in: vec![0],
        database: scratch.as_ref().map(|db| db.url().to_owned()),
        controllers: setup.controllers(),
        ..Default::default()
    })
    .await
    .with_context(|| format!("starting {}", setup.words()))?;
    let result = measure(ctx, setup, &cluster, scratch.as_ref())
        .await
        .with_context(|| setup.words());
    // The processes stop before their database goes.
    cluster.stop();
    drop(scratch);
    result
}

async fn measure(
    ctx: &Ctx,
    setup: Setup,
    cluster: &Cluster,
    scratch: Option<&ScratchDatabase>,
) -> Result<Measured> {
    let api = Api::new(&cluster.info);
    let agent_addrs: Vec<String> = std::iter::once(cluster.info.agent_addr.clone())
        .chain(cluster.others.iter().map(|c| c.agent_addr.clone()))
        .collect();
    let controllers: Vec<u32> = std::iter::once(&cluster.controller_config)
        .chain(cluster.others.iter().map(|c| &c.config))
        .map(|config| {
            sys::pid_with_arg(&config.to_string_lossy())
                .with_context(|| format!("the process of {}", config.display()))
        })
        .collect::<Result<_>>()?;
    let mut swarms = Vec::new();
    let mut first = 1;
    let mut jobs_per_sec = None;
    if setup.controllers() == 1 {
        let mut swarm = SwarmProcess::start_spread(
            ctx,
            cluster,
            &agent_addrs,
            first,
            THROUGHPUT_HOSTS,
            cluster.dir.join("swarm-throughput.log"),
            &[],
        )
        .await?;
        swarm.wait_welcomed(Duration::from_secs(60)).await?;
        swarms.push(swarm);
        let hosts = api
            .wait_online(PREFIX, THROUGHPUT_HOSTS, Duration::from_secs(60))
            .await?;
        let window = Duration::from_secs(if ctx.quick { 5 } else { 10 });
        jobs_per_sec = Some(api.single_host_rate(&hosts, IN_FLIGHT, window).await?);
        first += THROUGHPUT_HOSTS;
    }
    let mut swarm = SwarmProcess::start_spread(
        ctx,
        cluster,
        &agent_addrs,
        first,
        HOSTS + 1 - first,
        cluster.dir.join("swarm.log"),
        &[],
    )
    .await?;
    swarm.wait_welcomed(Duration::from_secs(600)).await?;
    swarms.push(swarm);
    let hosts = api
        .wait_online(PREFIX, HOSTS, Duration::from_secs(120))
        .await?;
    // Each new agent's first heartbeat and the registration writes settle first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spread = match scratch {
        Some(db) if setup.controllers() > 1 => agents_per_controller(db.url()).await?,
        _ => Vec::new(),
    };

    let before = snapshot(cluster, scratch).await?;
    let runs = if ctx.quick { 3 } else { 7 };
    let limit = Duration::from_secs(120);
    // One run to warm caches and allocators; not timed, but its rows count.
    api.run_timed(&hosts, "echo ok\n", POLL, limit).await?;
    let (mut timed, mut stages, mut controller_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let cpu =
            |pids: &[u32]| -> Result<Vec<f64>> { pids.iter().map(|p| sys::cpu_secs(*p)).collect() };
        let c0 = cpu(&controllers)?;
        let t = api.run_timed(&hosts, "echo ok\n", POLL, limit).await?;
        let c1 = cpu(&controllers)?;
        controller_cpu.push(c1.iter().zip(&c0).map(|(a, b)| a - b).collect());
        stages.push(api.stages(&t).await?);
        timed.push(t);
    }
    let after = snapshot(cluster, scratch).await?;
    for s in swarms {
        s.stop().await;
    }
    let host_runs = (runs + 1) * HOSTS;
    let (costs, total) = per_host_run(&before, &after, host_runs);
    // The figures print at the end of the whole run; these lines show them as they come.
    let to_final: Vec<f64> = timed.iter().map(|t| t.to_final.as_secs_f64()).collect();
    println!(
        "  {}: accept -> all final p50 {:.3} s, p99 {:.3} s; {:.2} rows, {:.0} B per host-run \
         ({}){}",
        setup.words(),
        quantile(&to_final, 0.5),
        quantile(&to_final, 0.99),
        total.rows,
        total.bytes,
        breakdown(&costs),
        jobs_per_sec.map_or(String::new(), |r| format!("; {r:.0} single-host jobs/s")),
    );
    Ok(Measured {
        setup,
        timed,
        stages,
        controller_cpu,
        jobs_per_sec,
        costs,
        total,
        spread,
    })
}

/// Rows and bytes of every table.
#[derive(Debug, Clone, Default, PartialEq)]
struct Snapshot {
    tables: BTreeMap<String, (i64, i64)>,
}

/// A table's growth per host-run.
#[derive(Debug, Clone, PartialEq)]
struct TableCost {
    table: String,
    rows: f64,
    bytes: f64,
}

/// What each host-run between two snapshots cost every table that changed, most bytes first,
/// and all of them together.
fn per_host_run(
    before: &Snapshot,
    after: &Snapshot,
    host_runs: usize,
) -> (Vec<TableCost>, TableCost) {
    let runs = host_runs.max(1) as f64;
    let mut costs: Vec<TableCost> = after
        .tables
        .iter()
        .filter_map(|(table, &(rows, bytes))| {
            let (rows0, bytes0) = before.tables.get(table).copied().unwrap_or((0, 0));
            (rows != rows0 || bytes != bytes0).then(|| TableCost {
                table: table.clone(),
                rows: (rows - rows0) as f64 / runs,
                bytes: (bytes - bytes0) as f64 / runs,
            })
        })
        .collect();
    costs.sort_by(|a, b| b.bytes.total_cmp(&a.bytes).then(a.table.cmp(&b.table)));
    let total = TableCost {
        table: "all".into(),
        rows: costs.iter().map(|c| c.rows).sum(),
        bytes: costs.iter().map(|c| c.bytes).sum(),
    };
    (costs, total)
}

/// `host_result 1.00 rows 318 B, …`: the breakdown as a note.
fn breakdown(costs: &[TableCost]) -> String {
    costs
        .iter()
        .map(|c| format!("{} {:.2} rows {:.0} B", c.table, c.rows, c.bytes))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn snapshot(cluster: &Cluster, scratch: Option<&ScratchDatabase>) -> Result<Snapshot> {
    match scratch {
        Some(db) => postgres_snapshot(db.url())
            .await
            .context("measuring the PostgreSQL tables"),
        None => sqlite_snapshot(&cluster.dir.join("controller.db"))
            .await
            .context("measuring the SQLite tables"),
    }
}

/// Every table's rows and `pg_total_relation_size` (table, indexes, TOAST) after a `VACUUM`:
/// dead row versions become free space, which stays in the files and counts.
async fn postgres_snapshot(url: &str) -> Result<Snapshot> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql("VACUUM").execute(&mut conn).await?;
    let sizes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.relname::text, pg_total_relation_size(c.oid)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema()",
    )
    .fetch_all(&mut conn)
    .await?;
    let mut tables = BTreeMap::new();
    for (table, bytes) in sizes {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\""))
            .fetch_one(&mut conn)
            .await?;
        tables.insert(table, (rows, bytes));
    }
    conn.close().await?;
    Ok(Snapshot { tables })
}

/// Every table's rows and the bytes of the pages it and its indexes use (`dbstat`), read beside
/// the controller's own connections (WAL: the last committed state).
async fn sqlite_snapshot(path: &Path) -> Result<Snapshot> {
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let sizes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT m.tbl_name, SUM(d.pgsize) FROM dbstat AS d
         JOIN sqlite_master AS m ON m.name = d.name
         WHERE m.tbl_name NOT LIKE 'sqlite_%'
         GROUP BY m.tbl_name",
    )
    .fetch_all(&mut conn)
    .await
    .context("reading dbstat")?;
    let mut tables = BTreeMap::new();
    for (table, bytes) in sizes {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\""))
            .fetch_one(&mut conn)
            .await?;
        tables.insert(table, (rows, bytes));
    }
    conn.close().await?;
    Ok(Snapshot { tables })
}

/// The agents connected to each controller, as the controllers recorded them.
async fn agents_per_controller(url: &str) -> Result<Vec<(String, i64)>> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let spread = sqlx::query_as(
        "SELECT controller, count(*) FROM agent_connection GROUP BY controller ORDER BY controller",
    )
    .fetch_all(&mut conn)
    .await?;
    conn.close().await?;
    Ok(spread)
}

/// Why the spread of agents does not make the figure: every controller must hold at least a
/// third of them.
fn spread_problem(spread: &[(String, i64)], controllers: usize, agents: usize) -> Option<String> {
    let least = agents as i64 / (controllers as i64 * 3).max(1);
    (spread.len() < controllers || spread.iter().any(|(_, n)| *n < least)).then(|| {
        format!(
            "agents not spread over the {controllers} controllers: {}",
            spread_text(spread)
        )
    })
}

fn spread_text(spread: &[(String, i64)]) -> String {
    if spread.is_empty() {
        return "none recorded".into();
    }
    spread
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn push_fanout(figures: &mut Vec<Figure>, m: &Measured) {
    let to_final: Vec<f64> = m.timed.iter().map(|t| t.to_final.as_secs_f64()).collect();
    let failed: usize = m.stages.iter().map(|s| s.failed_hosts).sum();
    let per_controller: Vec<String> = (0..m.controller_cpu.first().map_or(0, Vec::len))
        .map(|i| {
            let cpu: Vec<f64> = m.controller_cpu.iter().map(|run| run[i]).collect();
            format!("c{} {:.2}", i + 1, quantile(&cpu, 0.5))
        })
        .collect();
    let mut note = format!(
        "{} runs after 1 warm-up; {}; controller CPU-s per run (median): {}",
        m.timed.len(),
        stage_profile(&m.stages),
        per_controller.join(", ")
    );
    let mut invalid = (failed > 0).then(|| format!("{failed} host results were not success"));
    if m.setup.controllers() > 1 {
        note = format!(
            "jobs submitted to c1; agents connected: {}; {note}",
            spread_text(&m.spread)
        );
        invalid = invalid.or_else(|| spread_problem(&m.spread, m.setup.controllers(), HOSTS));
    }
    let key = m.setup.key();
    let words = m.setup.words();
    let mut p99 = Figure::new(
        "postgres",
        format!("postgres.fanout_10000_{key}.p99"),
        format!("fan-out 10,000 hosts, {words}, accept -> all final, p99 (EMULATED executor)"),
    )
    .value(quantile(&to_final, 0.99), "s");
    if m.setup != Setup::Sqlite {
        p99 = p99
            .at_most(TARGET_SECS)
            .baseline("target (issue #13): <= 1.5 s on this machine");
    }
    figures.push(
        Figure::new(
            "postgres",
            format!("postgres.fanout_10000_{key}.p50"),
            format!("fan-out 10,000 hosts, {words}, accept -> all final, p50 (EMULATED executor)"),
        )
        .value(quantile(&to_final, 0.5), "s")
        .note(note)
        .invalid_if(invalid.clone()),
    );
    figures.push(p99.invalid_if(invalid));
}

fn push_throughput(figures: &mut Vec<Figure>, sqlite: &Measured, postgres: &Measured) {
    let label = |words: &str| {
        format!(
            "single-host jobs/s, {words} ({IN_FLIGHT} in flight, {THROUGHPUT_HOSTS} swarm hosts, emulated)"
        )
    };
    if let Some(rate) = sqlite.jobs_per_sec {
        figures.push(
            Figure::new(
                "postgres",
                "postgres.throughput_sqlite",
                label(sqlite.setup.words()),
            )
            .value(rate, "jobs/s")
            .note("same method as `overhead` (metrics off, audit on): the comparison for the next line"),
        );
    }
    if let Some(rate) = postgres.jobs_per_sec {
        let mut figure = Figure::new(
            "postgres",
            "postgres.throughput",
            label(postgres.setup.words()),
        )
        .value(rate, "jobs/s");
        if let Some(base) = sqlite.jobs_per_sec {
            figure = figure.baseline(format!(
                "{:.0}% of SQLite's {base:.0} jobs/s in the same run",
                100.0 * rate / base
            ));
        }
        figures.push(figure);
    }
}

/// Rows and bytes per host-run in all, and (`per_table`) a figure per table.
fn push_footprint(figures: &mut Vec<Figure>, m: &Measured, per_table: bool) {
    let (prefix, words) = match m.setup {
        Setup::Sqlite => ("postgres.sqlite_", "SQLite (dbstat pages)"),
        Setup::Postgres { controllers: 1 } => ("postgres.", "PostgreSQL, one controller"),
        Setup::Postgres { .. } => ("postgres.2c_", "PostgreSQL, two controllers"),
    };
    let runs = format!(
        "{} fan-outs of 10,000 hosts (3-byte output each)",
        m.timed.len() + 1
    );
    figures.push(
        Figure::new(
            "postgres",
            format!("{prefix}rows_per_host_run"),
            format!("database rows per host-run, {words}"),
        )
        .value(m.total.rows, "rows")
        .note(format!("{runs}; {}", breakdown(&m.costs))),
    );
    figures.push(
        Figure::new(
            "postgres",
            format!("{prefix}bytes_per_host_run"),
            format!("database bytes per host-run, {words}"),
        )
        .value(m.total.bytes, "B")
        .note(match m.setup {
            Setup::Sqlite => format!("{runs}; pages of each table and its indexes"),
            Setup::Postgres { .. } => format!(
                "{runs}; pg_total_relation_size after VACUUM (table, indexes, TOAST; free space \
                 left by updates counts)"
            ),
        }),
    );
    if per_table {
        for cost in &m.costs {
            figures.push(
                Figure::new(
                    "postgres",
                    format!("{prefix}bytes_per_host_run.{}", cost.table),
                    format!("  … {}", cost.table),
                )
                .value(cost.bytes, "B")
                .note(format!("{:.2} rows per host-run", cost.rows)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(tables: &[(&str, i64, i64)]) -> Snapshot {
        Snapshot {
            tables: tables
                .iter()
                .map(|(t, rows, bytes)| ((*t).to_owned(), (*rows, *bytes)))
                .collect(),
        }
    }

    #[test]
    fn costs_per_host_run_count_what_changed() {
        let before = snapshot(&[
            ("host_result", 10, 8_192),
            ("host_log", 10, 8_192),
            ("script", 3, 16_384),
        ]);
        let after = snapshot(&[
            ("host_result", 2_010, 8_192 + 600_000),
            ("host_log", 2_010, 8_192 + 400_000),
            ("script", 3, 16_384),
            ("job_instance", 1, 16_384),
        ]);
        let (costs, total) = per_host_run(&before, &after, 2_000);
        let tables: Vec<&str> = costs.iter().map(|c| c.table.as_str()).collect();
        // Unchanged tables are left out; the largest comes first.
        assert_eq!(tables, ["host_result", "host_log", "job_instance"]);
        assert_eq!(costs[0].rows, 1.0);
        assert_eq!(costs[0].bytes, 300.0);
        // A table that appeared counts from nothing.
        assert_eq!(costs[2].rows, 0.0005);
        assert_eq!(total.rows, 2.0005);
        assert!((total.bytes - (300.0 + 200.0 + 8.192)).abs() < 1e-9);
        assert_eq!(
            breakdown(&costs[..2]),
            "host_result 1.00 rows 300 B, host_log 1.00 rows 200 B"
        );
    }

    #[test]
    fn a_table_that_shrank_counts_against_the_total() {
        let before = snapshot(&[("host_task", 100, 8_192)]);
        let after = snapshot(&[("host_task", 0, 8_192), ("host_result", 100, 8_292)]);
        let (costs, total) = per_host_run(&before, &after, 100);
        assert_eq!(costs.len(), 2);
        assert_eq!(total.rows, 0.0);
        assert_eq!(total.bytes, 82.92);
    }

    #[test]
    fn agents_must_be_spread_over_every_controller() {
        let even = [("c1".to_owned(), 5_000), ("c2".to_owned(), 5_000)];
        assert_eq!(spread_problem(&even, 2, 10_000), None);
        let lopsided = [("c1".to_owned(), 9_000), ("c2".to_owned(), 1_000)];
        let why = spread_problem(&lopsided, 2, 10_000).unwrap();
        assert!(why.contains("c1 9000, c2 1000"), "{why}");
        let one = [("c1".to_owned(), 10_000)];
        assert!(spread_problem(&one, 2, 10_000).is_some());
        assert!(
            spread_problem(&[], 2, 10_000)
                .unwrap()
                .contains("none recorded")
        );
    }

    #[test]
    fn the_server_is_a_postgres_url_or_the_local_one() {
        assert_eq!(server_from(None).unwrap(), DEFAULT_SERVER);
        assert_eq!(server_from(Some(String::new())).unwrap(), DEFAULT_SERVER);
        let url = "postgresql://bench@db.example:5433";
        assert_eq!(server_from(Some(url.into())).unwrap(), url);
        let why = server_from(Some("sqlite:///tmp/x".into())).unwrap_err();
        assert!(why.to_string().contains(SERVER_VARIABLE), "{why}");
    }

    #[tokio::test]
    async fn a_server_that_is_not_there_fails_with_its_name() {
        // A port nothing listens on: bound, then released.
        let port = fleetrun_testkit::cluster::free_port().unwrap();
        let server = format!("postgres://postgres@127.0.0.1:{port}");
        let why = probe(&server).await.unwrap_err().to_string();
        assert!(why.contains(&server), "{why}");
        assert!(why.contains("not reachable"), "{why}");
        assert!(why.contains(SERVER_VARIABLE), "{why}");
    }
}
