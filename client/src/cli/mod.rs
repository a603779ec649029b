//! The `lockctl` command line: argument structs (argh; doc comments are the help text), and
//! [`run`], which executes a parsed command and prints its results. Exposed so the binary
//! stays a thin `main` and the parsing is unit-testable.

mod format;
mod recipes;
mod run;

use argh::FromArgs;

pub use run::{run, run_code};

/// Default endpoint when neither --endpoints nor LOCKD_ENDPOINTS is given.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";

/// Command-line client for lockd, a coordination service (sessions, ephemeral nodes, locks).
#[derive(FromArgs, Debug, PartialEq)]
pub struct Lockctl {
    /// comma-separated client addresses of cluster nodes (default: $LOCKD_ENDPOINTS, else
    /// 127.0.0.1:7001)
    #[argh(option)]
    pub endpoints: Option<String>,
    /// print machine-readable output: one JSON object per result
    #[argh(switch)]
    pub json: bool,
    /// seconds to wait for an answer, reconnects included (default 5)
    #[argh(option, default = "5.0")]
    pub timeout: f64,
    /// what to do
    #[argh(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand)]
pub enum Command {
    /// `get`
    Get(GetCmd),
    /// `put`
    Put(PutCmd),
    /// `create`
    Create(CreateCmd),
    /// `delete`
    Delete(DeleteCmd),
    /// `ls`
    Ls(LsCmd),
    /// `stat`
    Stat(StatCmd),
    /// `session`
    Session(SessionCmd),
    /// `cluster`
    Cluster(ClusterCmd),
    /// `lock`
    Lock(LockCmd),
    /// `elect`
    Elect(ElectCmd),
    /// `watch`
    Watch(WatchCmd),
    /// `locks`
    Locks(LocksCmd),
}

/// Run a command while holding a lock. CMD runs in its own process group with
/// LOCKD_FENCING_TOKEN and LOCKD_LOCK in its environment; lockctl exits with CMD's status
/// and releases the lock. When the session's safe bound nears (no keepalive answered),
/// the group gets SIGTERM --grace seconds before the bound and SIGKILL at it; if the lock is
/// lost the group is killed and lockctl exits non-zero. Only resources that check the
/// fencing token are protected against a holder that was paused (a stopped lockctl cannot
/// kill anything).
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "lock")]
pub struct LockCmd {
    /// lock name
    #[argh(positional)]
    pub name: String,
    /// the command and its arguments (after --)
    #[argh(positional, greedy)]
    pub cmd: Vec<String>,
    /// give up if the lock is not acquired within S seconds (default: wait)
    #[argh(option)]
    pub timeout: Option<f64>,
    /// session TTL in seconds (default 10)
    #[argh(option, default = "10.0")]
    pub ttl: f64,
    /// lock-delay in seconds after a holder's session expires (default 0, at most 60)
    #[argh(option)]
    pub lock_delay: Option<f64>,
    /// seconds between SIGTERM and SIGKILL before the safe bound (default: a quarter of
    /// the TTL, at most 2)
    #[argh(option)]
    pub grace: Option<f64>,
}

/// Leader election: with VALUE and CMD, campaign and run CMD while leader (like `lock`,
/// with LOCKD_FENCING_TOKEN, LOCKD_LOCK and LOCKD_LEADER_VALUE); with --observe, print
/// leader changes until interrupted.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "elect")]
pub struct ElectCmd {
    /// election name
    #[argh(positional)]
    pub name: String,
    /// the leader's value, then the command and its arguments (after --)
    #[argh(positional, greedy)]
    pub args: Vec<String>,
    /// print leader changes instead of campaigning
    #[argh(switch)]
    pub observe: bool,
    /// session TTL in seconds (default 10)
    #[argh(option, default = "10.0")]
    pub ttl: f64,
    /// seconds between SIGTERM and SIGKILL before the safe bound
    #[argh(option)]
    pub grace: Option<f64>,
}

/// Stream events of a node (default), its children, or everything below it, one line (or
/// JSON object) per event, until interrupted.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "watch")]
pub struct WatchCmd {
    /// node path
    #[argh(positional)]
    pub path: String,
    /// every node at or below PATH
    #[argh(switch)]
    pub recursive: bool,
    /// children of PATH
    #[argh(switch)]
    pub children: bool,
    /// first revision to show (default: the next one)
    #[argh(option)]
    pub from: Option<u64>,
    /// include node data
    #[argh(switch)]
    pub data: bool,
}

/// List locks with their holders (token, session), waiters and lock-delay.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "locks")]
pub struct LocksCmd {}

/// Print a node's data (raw bytes; with --json also its stat and revision).
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "get")]
pub struct GetCmd {
    /// node path, e.g. /config/db
    #[argh(positional)]
    pub path: String,
    /// read from the answering node's state, which may lag (not linearizable)
    #[argh(switch)]
    pub stale: bool,
}

/// Set a node's data, creating the node if it does not exist. Implemented as a set; if that
/// fails with "no node", a create (persistent, parent must exist). With --if-version the set
/// only applies at that version and a missing node is an error, never created.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "put")]
pub struct PutCmd {
    /// node path
    #[argh(positional)]
    pub path: String,
    /// new data (UTF-8 text)
    #[argh(positional)]
    pub data: String,
    /// only set if the node's current version is V (compare-and-set)
    #[argh(option)]
    pub if_version: Option<u64>,
    /// only apply while lock NAME is held under TOKEN (a fenced write), as NAME:TOKEN
    #[argh(option)]
    pub fence: Option<String>,
}

/// Create a node. With --ephemeral, opens a session with --ttl, creates the node under it and
/// exits WITHOUT closing the session: the node disappears when the TTL lapses.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "create")]
pub struct CreateCmd {
    /// node path (the parent must exist)
    #[argh(positional)]
    pub path: String,
    /// initial data (UTF-8 text, default empty)
    #[argh(positional)]
    pub data: Option<String>,
    /// delete the node when its session ends
    #[argh(switch)]
    pub ephemeral: bool,
    /// append a 10-digit sequence number to the name
    #[argh(switch)]
    pub sequential: bool,
    /// TTL in seconds of the session owning an ephemeral node (default 10)
    #[argh(option, default = "10.0")]
    pub ttl: f64,
}

/// Delete a node (it must have no children).
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "delete")]
pub struct DeleteCmd {
    /// node path
    #[argh(positional)]
    pub path: String,
    /// only delete if the node's current version is V
    #[argh(option)]
    pub if_version: Option<u64>,
}

/// List a node's children, one name per line.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "ls")]
pub struct LsCmd {
    /// node path
    #[argh(positional)]
    pub path: String,
    /// read from the answering node's state, which may lag
    #[argh(switch)]
    pub stale: bool,
}

/// Show a node's metadata (versions, revisions, owner, sizes).
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "stat")]
pub struct StatCmd {
    /// node path
    #[argh(positional)]
    pub path: String,
    /// read from the answering node's state, which may lag
    #[argh(switch)]
    pub stale: bool,
}

/// Open a session and keep it alive, printing its status changes, until Ctrl-C (which closes
/// it) or until it expires.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "session")]
pub struct SessionCmd {
    /// session TTL in seconds (default 10)
    #[argh(option, default = "10.0")]
    pub ttl: f64,
}

/// Cluster administration.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "cluster")]
pub struct ClusterCmd {
    /// what to do
    #[argh(subcommand)]
    pub command: ClusterCommand,
}

/// The cluster subcommands.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand)]
pub enum ClusterCommand {
    /// `cluster status`
    Status(ClusterStatusCmd),
    /// `cluster add`
    Add(ClusterAddCmd),
    /// `cluster promote`
    Promote(ClusterPromoteCmd),
    /// `cluster remove`
    Remove(ClusterRemoveCmd),
    /// `cluster transfer-leader`
    TransferLeader(ClusterTransferCmd),
}

/// Show the cluster as the answering node sees it: leader, term, indexes, members.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "status")]
pub struct ClusterStatusCmd {}

/// Add a member as a non-voting learner; then start it with `lockd --join --id ID ...`, and
/// promote it once it has caught up.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "add")]
pub struct ClusterAddCmd {
    /// the new member's node id
    #[argh(positional)]
    pub id: u64,
    /// its peer address (HOST:PORT)
    #[argh(positional)]
    pub peer_addr: String,
    /// its client address (HOST:PORT)
    #[argh(positional)]
    pub client_addr: String,
}

/// Make a caught-up learner a voter.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "promote")]
pub struct ClusterPromoteCmd {
    /// the learner's node id
    #[argh(positional)]
    pub id: u64,
}

/// Remove a member (the leader too: it steps down once the change commits).
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "remove")]
pub struct ClusterRemoveCmd {
    /// the member's node id
    #[argh(positional)]
    pub id: u64,
}

/// Hand leadership to another voter (e.g. before maintenance of the leader's machine).
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "transfer-leader")]
pub struct ClusterTransferCmd {
    /// the voter to lead
    #[argh(positional)]
    pub id: u64,
}

/// The endpoints to use: the flag, else the environment variable's value, else the default.
/// Empty items are ignored.
///
/// ```
/// use lockd_client::cli::endpoints;
/// assert_eq!(endpoints(Some("a:1, b:2"), None), vec!["a:1", "b:2"]);
/// assert_eq!(endpoints(None, Some("c:3".into())), vec!["c:3"]);
/// assert_eq!(endpoints(None, None), vec!["127.0.0.1:7001"]);
/// ```
pub fn endpoints(flag: Option<&str>, env: Option<String>) -> Vec<String> {
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let from_flag = flag.map(split).filter(|v| !v.is_empty());
    let from_env = env.as_deref().map(split).filter(|v| !v.is_empty());
    from_flag
        .or(from_env)
        .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Lockctl, argh::EarlyExit> {
        Lockctl::from_args(&["lockctl"], args)
    }

    #[test]
    fn parses_globals_and_get() {
        let a = parse(&["--endpoints", "h:1,h:2", "--json", "get", "/a"]).expect("parse");
        assert_eq!(a.endpoints.as_deref(), Some("h:1,h:2"));
        assert!(a.json);
        assert_eq!(
            a.command,
            Command::Get(GetCmd {
                path: "/a".into(),
                stale: false
            })
        );
    }

    #[test]
    fn parses_create_flags_and_defaults() {
        let a = parse(&["create", "/e", "hello", "--ephemeral", "--sequential"]).expect("parse");
        let Command::Create(c) = a.command else {
            panic!("not create");
        };
        assert_eq!(c.data.as_deref(), Some("hello"));
        assert!(c.ephemeral && c.sequential);
        assert_eq!(c.ttl, 10.0);
        let a = parse(&["create", "/p", "--ttl", "2.5"]).expect("parse");
        let Command::Create(c) = a.command else {
            panic!("not create");
        };
        assert_eq!((c.data, c.ttl, c.ephemeral), (None, 2.5, false));
    }

    #[test]
    fn parses_put_delete_and_cluster() {
        let a = parse(&["put", "/a", "v", "--if-version", "3"]).expect("parse");
        assert_eq!(
            a.command,
            Command::Put(PutCmd {
                path: "/a".into(),
                data: "v".into(),
                if_version: Some(3),
                fence: None,
            })
        );
        let a = parse(&["delete", "/a"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Delete(DeleteCmd {
                if_version: None,
                ..
            })
        ));
        let a = parse(&["cluster", "status"]).expect("parse");
        assert!(matches!(a.command, Command::Cluster(_)));
        let a = parse(&["session", "--ttl", "30"]).expect("parse");
        assert_eq!(a.command, Command::Session(SessionCmd { ttl: 30.0 }));
    }

    #[test]
    fn usage_errors_and_help() {
        assert!(parse(&["get"]).is_err(), "missing path");
        assert!(parse(&["frobnicate"]).is_err());
        assert!(parse(&["put", "/a", "v", "--if-version", "x"]).is_err());
        let help = parse(&["put", "--help"]).expect_err("help");
        assert!(help.status.is_ok());
        assert!(help.output.contains("no node"), "{}", help.output);
    }

    #[test]
    fn parses_lock_elect_watch_locks() {
        let a = parse(&[
            "lock",
            "db",
            "--timeout",
            "3",
            "--",
            "sh",
            "-c",
            "echo $LOCKD_LOCK",
        ])
        .expect("parse");
        let Command::Lock(l) = a.command else {
            panic!("not lock");
        };
        assert_eq!((l.name.as_str(), l.timeout, l.ttl), ("db", Some(3.0), 10.0));
        assert_eq!(l.cmd, vec!["sh", "-c", "echo $LOCKD_LOCK"]);
        let a = parse(&["elect", "e", "v1", "--", "true"]).expect("parse");
        let Command::Elect(e) = a.command else {
            panic!("not elect");
        };
        assert_eq!(
            e.args,
            vec!["v1", "--", "true"],
            "the command part strips `--`"
        );
        let a = parse(&["elect", "e", "--observe"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Elect(ElectCmd { observe: true, .. })
        ));
        let a = parse(&["watch", "/a", "--recursive", "--from", "7", "--data"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Watch(WatchCmd {
                recursive: true,
                from: Some(7),
                data: true,
                ..
            })
        ));
        assert!(matches!(
            parse(&["locks"]).expect("parse").command,
            Command::Locks(_)
        ));
        let a = parse(&["put", "/a", "v", "--fence", "db:42"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Put(PutCmd { fence: Some(_), .. })
        ));
    }

    #[test]
    fn endpoint_precedence() {
        assert_eq!(endpoints(Some(""), Some("e:1".into())), vec!["e:1"]);
        assert_eq!(endpoints(Some("f:1"), Some("e:1".into())), vec!["f:1"]);
        assert_eq!(endpoints(None, Some(" , ".into())), vec![DEFAULT_ENDPOINT]);
    }
}
