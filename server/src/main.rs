//! `lockd`: the lockd server. With no flags, a single-node cluster with data in
//! `./lockd-data` and clients on 127.0.0.1:7001; with `--peers`, a member of a cluster
//! talking to its peers on `--peer-addr` (default 127.0.0.1:7101).

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;
use lockd_server::Config;

/// lockd: a coordination service of sessions, ephemeral nodes and exactly-once writes.
#[derive(FromArgs, Debug)]
struct Flags {
    /// this node's id (default 1)
    #[argh(option)]
    id: Option<u64>,
    /// directory of the database (default ./lockd-data)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// address for clients (default 127.0.0.1:7001)
    #[argh(option)]
    client_addr: Option<String>,
    /// address for peers (default 127.0.0.1:7101)
    #[argh(option)]
    peer_addr: Option<String>,
    /// initial cluster as ID=HOST:PORT,... (peer addresses, this node included); a single
    /// node needs none; a node with data keeps its stored members but takes addresses here
    #[argh(option)]
    peers: Option<String>,
    /// election timeout in ticks, randomized in [n, 2n) (default 10)
    #[argh(option)]
    election_ticks: Option<u32>,
    /// join an existing cluster as a new member (after `lockctl cluster add`): never
    /// campaigns before the leader adds it; --peers gives the members' peer addresses
    #[argh(switch)]
    join: bool,
    /// the cluster's identity, fixed when the data directory is created (default "lockd")
    #[argh(option)]
    cluster_token: Option<String>,
    /// TOML file with the same keys as the flags (flags win)
    #[argh(option)]
    config: Option<PathBuf>,
    /// tick length in ms: session deadlines are checked once per tick (default 100)
    #[argh(option)]
    tick_ms: Option<u64>,
    /// smallest session TTL granted, in ms (default 1000)
    #[argh(option)]
    session_ttl_min_ms: Option<u64>,
    /// largest session TTL granted, in ms (default 300000)
    #[argh(option)]
    session_ttl_max_ms: Option<u64>,
    /// largest frame in bytes (default 4 MiB)
    #[argh(option)]
    max_frame: Option<usize>,
    /// largest node data in bytes (default 1 MiB)
    #[argh(option)]
    max_data: Option<usize>,
    /// largest single request (a multi included) in bytes (default 3 MiB)
    #[argh(option)]
    max_proposal: Option<usize>,
    /// µs the loop polls for requests before parking (default 200 on a single node, 0 with
    /// peers; 0 saves CPU)
    #[argh(option)]
    spin_us: Option<u64>,
    /// most concurrent client connections (default 10000)
    #[argh(option)]
    max_connections: Option<usize>,
    /// log format: text or json (default text); the level comes from RUST_LOG (default info)
    #[argh(option)]
    log_format: Option<String>,
}

fn load_config(flags: Flags) -> Result<Config, String> {
    let mut config = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => Config::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => {$( if let Some(v) = flags.$field { config.$field = v; } )*};
    }
    set!(
        id,
        data_dir,
        client_addr,
        peer_addr,
        cluster_token,
        tick_ms,
        session_ttl_min_ms,
        session_ttl_max_ms,
        max_frame,
        max_data,
        max_proposal,
        log_format,
        max_connections,
        peers,
        election_ticks
    );
    if flags.join {
        config.join = true;
    }
    if let Some(us) = flags.spin_us {
        config.spin_us = Some(us);
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    let flags: Flags = argh::from_env();
    let config = match load_config(flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lockd: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.client_addr)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.client_addr))?;
        tracing::info!(data_dir = %config.data_dir.display(), "starting lockd");
        lockd_server::run(listener, config, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockd: {e}");
            ExitCode::FAILURE
        }
    }
}
