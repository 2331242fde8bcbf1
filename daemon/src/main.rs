use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::Parser as _;
use fanout::{
    agent::Agent,
    cli::{Cli, Command},
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // Before the runtime makes any thread: the arenas are chosen at a thread's first allocation.
    fanout::heap::tune_malloc();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(main_async())
}

async fn main_async() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Verify(args) => std::process::exit(fanout::verify::run(&args).await),
    }
}

async fn run(args: fanout::cli::RunArgs) -> anyhow::Result<()> {
    let agent = Agent::start(args.agent_options())
        .await
        .context("starting fanout")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
    agent.shutdown().await.context("shutting down")?;
    Ok(())
}
