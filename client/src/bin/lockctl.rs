//! `lockctl`: the command-line client for lockd. Parsing and execution live in
//! `lockd_client::cli`; this file sets up logging and the runtime and maps outcomes to exit
//! codes: 0 success, 1 a failed request (one line on stderr), 2 a usage error; `lock` and
//! `elect` with a command exit with the command's status, or 75 if the lock was lost.

use std::process::ExitCode;

use lockd_client::cli::{run_code, Lockctl};

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (cmd, rest) = match strs.split_first() {
        Some((cmd, rest)) => (*cmd, rest),
        None => ("lockctl", &[][..]),
    };
    let cmd = std::path::Path::new(cmd)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("lockctl");
    let args = match <Lockctl as argh::FromArgs>::from_args(&[cmd], rest) {
        Ok(args) => args,
        Err(early) => {
            return if early.status.is_ok() {
                print!("{}", early.output);
                ExitCode::SUCCESS
            } else {
                eprint!("{}", early.output);
                ExitCode::from(2)
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_code(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("lockctl: {e}");
            ExitCode::FAILURE
        }
    }
}
