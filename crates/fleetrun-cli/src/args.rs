//! The command line, as clap reads it. Help texts teach by example.

mod admin;

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use fleetrun_api::ScriptLanguage;

pub use self::admin::*;

const EXAMPLES: &str = "\
Examples:
  # Use the local cluster that `cargo xtask cluster` started
  export FLEETRUN_CLUSTER=target/cluster/cluster.json

  fleetrun run --host 1,2,3 -c 'uptime'             run a command, watch it live
  fleetrun run --ip 10.0.0.5,1:10.0.0.6 --script deploy.sh --param 'v2 --force'
  fleetrun run --host 1 -c 'sleep 600' --detach     print the job id and return
  fleetrun logs 17 --follow                         output as it is written
  fleetrun status 17                                each host's result
  fleetrun jobs --status failed --since 7d          recent jobs
  fleetrun kill 17                                  terminate a running job
  fleetrun hosts --offline                          hosts whose agent is away
  fleetrun scripts create --name deploy --version v1 deploy.sh
                                                    add a script to the library
  fleetrun run --host 1 --script-id ID              run its online version
  fleetrun topology                                 businesses, sets, modules, groups
  fleetrun node add set:12 --name cache --parent biz:2
  fleetrun hosts move 3,4 --biz 2 --module 120      put hosts in a module
  fleetrun groups add big --biz 2 --name 'big hosts' --where 'host.cpu range 8..'
  fleetrun inventory history                        who changed the inventory, and how
  fleetrun inventory show > inventory.toml          the inventory as a document
  fleetrun inventory apply inventory.toml --expect-revision 8
  fleetrun inventory reload                         read the inventory file again

Settings (first found wins): flags, then environment (FLEETRUN_URL, FLEETRUN_APP_CODE,
FLEETRUN_APP_SECRET, FLEETRUN_USERNAME, FLEETRUN_SCOPE), then one file: --cluster FILE
(an xtask cluster.json), else --config FILE, else $XDG_CONFIG_HOME/fleetrun/config.toml
(~/.config/fleetrun/config.toml), with the keys url, app_code, app_secret, username, scope.
The username defaults to $USER. Every command but `hosts`, `topology`, `groups` and the
inventory's administration (`inventory`, `biz`, `bizset`, `node`, `... add|update|rm`) needs a
scope (--scope biz:2); administration needs an app granted admin (`admin = true`).

Exit status:
  0    every host succeeded (or the command did what it was asked)
  1    a host failed, timed out, was offline or was terminated
  2    usage error: bad flags, missing settings, unreadable script
  3    the controller refused the request (its code and message are printed), or an --ip
       mixed with --host names no registered host
  4    the controller cannot be reached, or its answer is not fleetrun's
  130  interrupted (Ctrl-C); a job started by `run` keeps running";

const RUN_EXAMPLES: &str = "\
Examples:
  fleetrun run --host 1,2 -c 'df -h /'                    as root (the default account)
  fleetrun run --ip 127.0.0.10 --as deploy --script ./check.py --timeout 60
  fleetrun run --host 1 --script - --lang python < job.py  script from standard input
  fleetrun run --host 1 -c 'echo \"$1\"' --param \"'a b'\"    one argument: a b
  fleetrun run --topo set:10 --group web -c 'uptime'      targets from the inventory
  fleetrun run --host 1 -c 'make' --output jsonl          events as they arrive
  job=$(fleetrun run --host 1 -c 'sleep 60' --detach)     start, then: fleetrun logs $job -f

Targets mix freely: --host IDs, --ip [CLOUD:]IP (cloud area 0 unless given), --topo TYPE:ID
and --group ID. The script's language follows the file's extension (.sh .bash .bat .cmd .pl
.py .ps1) or its #! line; --lang overrides. While the job runs, a progress line counts waiting,
running, succeeded and failed hosts; each output line is prefixed by its host's IP. At the end
hosts are grouped by outcome and identical outputs are folded (\"37 hosts: ok\").
Ctrl-C stops watching; the job keeps running (fleetrun kill JOB ends it).";

const SCRIPTS_EXAMPLES: &str = "\
Examples:
  fleetrun scripts create --name deploy --version v1 deploy.sh   a new script (a draft)
  fleetrun scripts publish SCRIPT_ID VERSION_ID                   make that version online
  fleetrun run --host 1,2 --script-id SCRIPT_ID                   run the online version
  fleetrun scripts add-version SCRIPT_ID --version v2 deploy.sh   a new draft version
  fleetrun scripts list --lang python                             the scope's scripts
  fleetrun scripts versions SCRIPT_ID                             a script's versions
  fleetrun scripts show VERSION_ID > deploy.sh                    a version's content

A version is a draft, online, offline or disabled. At most one version of a script is online:
publishing another sets the previous one offline. Online and offline versions run.";

/// Run scripts on many hosts through a fleetrun (bk-job compatible) controller.
#[derive(Debug, Parser)]
#[command(name = "fleetrun", version, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Settings and output")]
pub struct Global {
    /// The controller's URL, e.g. http://10.0.0.2:8080
    #[arg(long, global = true, env = "FLEETRUN_URL", value_name = "URL")]
    pub url: Option<String>,
    /// The app's bk_app_code
    #[arg(long, global = true, env = "FLEETRUN_APP_CODE", value_name = "CODE")]
    pub app_code: Option<String>,
    /// The app's bk_app_secret (never printed)
    #[arg(
        long,
        global = true,
        env = "FLEETRUN_APP_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub app_secret: Option<String>,
    /// The operator recorded on jobs (bk_username); default $USER
    #[arg(long, global = true, env = "FLEETRUN_USERNAME", value_name = "NAME")]
    pub username: Option<String>,
    /// The scope to act in: biz:ID (or biz_set:ID)
    #[arg(long, global = true, env = "FLEETRUN_SCOPE", value_name = "TYPE:ID")]
    pub scope: Option<String>,
    /// Settings file (TOML) instead of ~/.config/fleetrun/config.toml
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Take URL, credentials and scope from an xtask cluster.json
    #[arg(long, global = true, env = "FLEETRUN_CLUSTER", value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// text for people; json: one document at the end; jsonl: events as they arrive
    #[arg(
        long,
        short = 'o',
        global = true,
        value_enum,
        default_value_t = Output::Text
    )]
    pub output: Output,
    /// Print only the summary (run) or only what was asked
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Print each request (URL, API, app, user; never the secret) on stderr
    #[arg(long, short, global = true)]
    pub verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Jsonl,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a script on hosts and watch it until it ends
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Upload local files and send them to hosts (fast_transfer_file), watching each host
    #[command(after_help = crate::transfer::PUSH_EXAMPLES)]
    Push(Box<crate::transfer::PushArgs>),
    /// Copy files from hosts to hosts (fast_transfer_file), watching each host
    #[command(after_help = crate::transfer::CP_EXAMPLES)]
    Cp(Box<crate::transfer::CpArgs>),
    /// Show a job's status and each host's result
    Status {
        /// The job instance id
        job: i64,
    },
    /// Show a job's output, prefixed by host; --follow to watch it being written
    Logs {
        /// The job instance id
        job: i64,
        /// Only these hosts (bk_host_id)
        #[arg(long = "host", value_name = "ID,...", value_delimiter = ',')]
        hosts: Vec<i64>,
        /// Keep printing output as it is written, until the job ends
        #[arg(long, short)]
        follow: bool,
    },
    /// List recent jobs, newest first
    Jobs(JobsArgs),
    /// Terminate a running job (operate_job_instance, code 1)
    Kill {
        /// The job instance id
        job: i64,
        /// Return once the controller accepted the request, without waiting for the end
        #[arg(long)]
        no_wait: bool,
    },
    /// Let a rolling job waiting for a confirmation run its next batch
    Confirm {
        /// The job instance id
        job: i64,
    },
    /// Let a rolling job paused on a failed batch go on, its failures ignored
    Ignore {
        /// The job instance id
        job: i64,
    },
    /// Run a failed or terminated job's failed hosts again (or all of them), under the next
    /// execute_count
    Retry {
        /// The job instance id
        job: i64,
        /// Run every host again, not only the failed ones
        #[arg(long)]
        all: bool,
    },
    /// List the hosts (agents' and the inventory's); add, update, move or remove them
    Hosts(HostsArgs),
    /// The scope's script library: list, show, create, publish, disable
    #[command(subcommand, after_help = SCRIPTS_EXAMPLES)]
    Scripts(ScriptsCommand),
    /// Show the inventory as a tree: businesses, their nodes with host counts, dynamic groups
    #[command(after_help = "\
Examples:
  fleetrun topology                   business -> sets -> modules, with host counts
  fleetrun topology -o json           every node with its host ids (get_topology)")]
    Topology,
    /// The inventory as a document: show, history, apply, change, reload
    #[command(subcommand, after_help = INVENTORY_EXAMPLES)]
    Inventory(InventoryCommand),
    /// Add, rename or remove a business
    #[command(subcommand)]
    Biz(BizCommand),
    /// Add, update or remove a business set
    #[command(subcommand)]
    Bizset(BizsetCommand),
    /// Add, update or remove a topology node: a set, a module or a custom level's
    #[command(subcommand)]
    Node(NodeCommand),
    /// List the dynamic groups (saved host queries); add, update or remove them
    Groups(GroupsArgs),
    /// List the accounts usable in the scope; add, update or remove them
    Accounts(AccountsArgs),
    /// Revoke an agent, lift a revocation, list the revoked agents
    #[command(subcommand, after_help = AGENTS_HELP)]
    Agents(AgentsCommand),
    /// Read the controller's audit trail, or verify its hash chain
    Audit(crate::audit::AuditArgs),
    /// Dangerous-command rules: list, create, update, delete, enable, disable
    #[command(subcommand, after_help = crate::rules::RULES_HELP)]
    Rules(crate::rules::RulesCommand),
    /// Check a script against the enabled dangerous-command rules (exit 1 if it would be refused)
    CheckScript(crate::rules::CheckScriptArgs),
    /// Join tokens that let new hosts enroll: create (prints the install command), list, revoke
    #[command(subcommand)]
    Tokens(crate::tokens::TokensCommand),
    /// Print a shell completion script: fleetrun completions bash > /etc/bash_completion.d/fleetrun
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one per command into --dir
    Man {
        /// Write fleetrun.1 and fleetrun-<command>.1 into this directory
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScriptsCommand {
    /// List the scope's scripts: id, name, language, online version
    #[command(after_help = "\
Examples:
  fleetrun scripts list                       every script of the scope
  fleetrun scripts list --name deploy         scripts whose name contains deploy
  fleetrun scripts list --lang python -o json")]
    List {
        /// Only scripts whose name contains this
        #[arg(long, value_name = "TEXT")]
        name: Option<String>,
        /// Only scripts in this language
        #[arg(long, value_enum, value_name = "LANG")]
        lang: Option<Lang>,
    },
    /// List a script's versions, newest first
    #[command(after_help = "\
Examples:
  fleetrun scripts versions 3f2a9c0e...       id, version, status, creator, time")]
    Versions {
        /// The script id
        script_id: String,
    },
    /// Print a version's content (its details go to standard error)
    #[command(after_help = "\
Examples:
  fleetrun scripts show 17 > deploy.sh        the content of version 17
  fleetrun scripts show 17 -o json            details and content as JSON")]
    Show {
        /// The script version id
        version_id: i64,
    },
    /// Create a script from a file; its first version is a draft
    #[command(after_help = "\
Examples:
  fleetrun scripts create --name deploy --version v1 deploy.sh
  fleetrun scripts create --name check --version 1.0 --lang python - < check

The language follows the file's extension (.sh .bash .bat .cmd .pl .py .ps1) or its #! line;
--lang overrides. -q prints only the script id and the version id.")]
    Create {
        /// The script's name (at most 60 characters)
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The first version's label, e.g. v1 (at most 60 characters)
        #[arg(long, value_name = "V")]
        version: String,
        /// The script file (`-` for standard input)
        file: PathBuf,
        /// The script's language, when the file name does not tell
        #[arg(long, value_enum, value_name = "LANG")]
        lang: Option<Lang>,
        /// What the script is for
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
    },
    /// Add a version to a script from a file; it is a draft until published
    #[command(after_help = "\
Examples:
  fleetrun scripts add-version 3f2a9c0e... --version v2 deploy.sh

-q prints only the new version id.")]
    AddVersion {
        /// The script id
        script_id: String,
        /// The new version's label, unique for the script
        #[arg(long, value_name = "V")]
        version: String,
        /// The script file (`-` for standard input)
        file: PathBuf,
    },
    /// Make a version online (the one `run --script-id` runs); the previous one goes offline
    #[command(after_help = "\
Examples:
  fleetrun scripts publish 3f2a9c0e... 17")]
    Publish {
        /// The script id
        script_id: String,
        /// The script version id
        version_id: i64,
    },
    /// Disable a version: it no longer runs and cannot be published again
    #[command(after_help = "\
Examples:
  fleetrun scripts disable 3f2a9c0e... 16")]
    Disable {
        /// The script id
        script_id: String,
        /// The script version id
        version_id: i64,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("targets").required(true).multiple(true)))]
#[command(group(ArgGroup::new("source").required(true).multiple(true)))]
pub struct RunArgs {
    /// Target hosts by bk_host_id
    #[arg(
        long = "host",
        value_name = "ID,...",
        value_delimiter = ',',
        group = "targets"
    )]
    pub hosts: Vec<i64>,
    /// Target hosts by IP, in cloud area CLOUD (default 0)
    #[arg(
        long = "ip",
        value_name = "[CLOUD:]IP,...",
        value_delimiter = ',',
        group = "targets"
    )]
    pub ips: Vec<String>,
    /// Every host below an inventory node, e.g. module:12 (repeatable)
    #[arg(long = "topo", value_name = "TYPE:ID", group = "targets")]
    pub topo: Vec<String>,
    /// Every host of a dynamic group (repeatable)
    #[arg(long = "group", value_name = "ID", group = "targets")]
    pub groups: Vec<String>,
    /// The script, inline (shell unless --lang)
    #[arg(short = 'c', long = "command", value_name = "SCRIPT", group = "source",
          conflicts_with_all = ["script", "script_id", "script_version"])]
    pub command: Option<String>,
    /// The script, from a file (`-` for standard input)
    #[arg(long, value_name = "FILE", group = "source", conflicts_with_all = ["script_id", "script_version"])]
    pub script: Option<PathBuf>,
    /// A script of the library: its online version
    #[arg(long, value_name = "ID", group = "source")]
    pub script_id: Option<String>,
    /// A script version of the library
    #[arg(long, value_name = "ID", group = "source")]
    pub script_version: Option<i64>,
    /// The script's language, when the file name does not tell
    #[arg(long, value_enum, value_name = "LANG")]
    pub lang: Option<Lang>,
    /// Run as this account: an alias, or a number for an account id
    #[arg(
        long = "as",
        value_name = "ACCOUNT",
        env = "FLEETRUN_ACCOUNT",
        default_value = "root"
    )]
    pub account: String,
    /// Seconds before the script is killed (controller default 7200)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u32>,
    /// Arguments for the script, split like a shell splits words (never expanded)
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    pub param: Option<String>,
    /// The parameter is secret: stored encrypted and never shown
    #[arg(long, requires = "param")]
    pub sensitive: bool,
    /// The job's name
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// URL the controller POSTs the job's result to when it ends
    #[arg(long, value_name = "URL")]
    pub callback: Option<String>,
    /// Print the job id and return at once instead of watching the job
    #[arg(long, short)]
    pub detach: bool,
    /// Roll out in batches (bk-job's expression): e.g. '1 10% 30%', '5 *2', '10 +5'
    #[arg(long = "batch", value_name = "EXPR")]
    pub batch: Option<String>,
    /// After a batch: pause when it failed, continue whatever happened, or confirm each next one
    #[arg(
        long,
        value_enum,
        value_name = "WHAT",
        requires = "batch",
        default_value = "pause"
    )]
    pub on_failure: OnFailure,
    /// Stop rolling once this many hosts failed
    #[arg(long, value_name = "N", requires = "batch",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_failures: Option<u32>,
    /// Print the batches --batch would make of the targets, and run nothing
    #[arg(long, requires = "batch")]
    pub dry_run: bool,
}

/// `run --on-failure`: bk-job's rolling mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailure {
    /// 1: a batch with a failed host pauses the rollout (`fleetrun ignore JOB` goes on)
    Pause,
    /// 2: every batch runs, failures or not
    Continue,
    /// 3: each next batch waits for `fleetrun confirm JOB`
    Confirm,
}

impl OnFailure {
    /// bk-job's `rolling_config.mode`.
    pub fn mode(self) -> i64 {
        match self {
            Self::Pause => 1,
            Self::Continue => 2,
            Self::Confirm => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    #[value(alias = "sh", alias = "bash")]
    Shell,
    #[value(alias = "cmd")]
    Bat,
    #[value(alias = "pl")]
    Perl,
    #[value(alias = "py")]
    Python,
    #[value(alias = "ps1", alias = "pwsh")]
    Powershell,
}

impl Lang {
    /// The name of bk-job's `script_language` code; "unknown" for one no job runs.
    pub fn name_of(code: i64) -> &'static str {
        i32::try_from(code)
            .ok()
            .map(ScriptLanguage::from_code)
            .filter(|language| language.runs_on_hosts())
            .and_then(ScriptLanguage::name)
            .unwrap_or("unknown")
    }

    /// The language in bk-job's terms.
    pub fn language(self) -> ScriptLanguage {
        match self {
            Self::Shell => ScriptLanguage::Shell,
            Self::Bat => ScriptLanguage::Bat,
            Self::Perl => ScriptLanguage::Perl,
            Self::Python => ScriptLanguage::Python,
            Self::Powershell => ScriptLanguage::PowerShell,
        }
    }

    /// bk-job's `script_language`.
    pub fn code(self) -> i64 {
        i64::from(self.language().code())
    }
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// How far back: 30m, 24h, 7d, 1h30m (at most 30d); a bare number is hours
    #[arg(long, value_name = "AGE", default_value = "24h")]
    pub since: String,
    /// Only jobs in this status: running, success, failed, terminated, ... or its number
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
    /// Only jobs whose name contains this
    #[arg(long, value_name = "TEXT")]
    pub name: Option<String>,
    /// Only jobs of this operator
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,
    /// At most this many jobs (1-1000)
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(i64).range(1..=1000))]
    pub limit: i64,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_needs_a_target_and_a_script() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        assert!(parse(&["fleetrun", "run", "-c", "true"]).is_err());
        assert!(parse(&["fleetrun", "run", "--host", "1"]).is_err());
        assert!(parse(&["fleetrun", "run", "--host", "1", "-c", "x", "--script", "f"]).is_err());
        let cli = parse(&[
            "fleetrun", "run", "--host", "1,2", "--host", "3", "-c", "true",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.hosts, [1, 2, 3]);
        assert_eq!(run.account, "root");
        // Global flags go anywhere.
        let cli = parse(&[
            "fleetrun",
            "run",
            "--ip",
            "1:10.0.0.1",
            "-c",
            "x",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Output::Json);
    }

    #[test]
    fn scripts_take_their_ids_and_files() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let cli = parse(&[
            "fleetrun",
            "scripts",
            "create",
            "--name",
            "n",
            "--version",
            "v1",
            "a.sh",
        ])
        .unwrap();
        let Command::Scripts(ScriptsCommand::Create { version, file, .. }) = cli.command else {
            panic!("not scripts create")
        };
        assert_eq!((version.as_str(), file.to_str()), ("v1", Some("a.sh")));
        assert!(parse(&["fleetrun", "scripts", "create", "--name", "n", "a.sh"]).is_err());
        assert!(parse(&["fleetrun", "scripts", "publish", "abc"]).is_err());
        assert!(parse(&["fleetrun", "scripts", "show", "x"]).is_err());
        assert!(parse(&["fleetrun", "scripts", "list", "--lang", "py"]).is_ok());
        assert!(parse(&["fleetrun", "inventory", "reload"]).is_ok());
        assert!(parse(&["fleetrun", "topology", "-o", "json"]).is_ok());
    }
}
