//! `cloud`: the client programs. Called as `deploy`, `status` or `retrieve`
//! (links to this binary, as in the original), or as `cloud <command>`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cloudinfra::archive_check::MAKEFILE_NAMES;
use cloudinfra::client::{pack_directory, Client, ClientError, DEFAULT_TIMEOUT};
use cloudinfra::proto::{JobState, JobStatus, ReplicaStatus};

const DEFAULT_SERVER: &str = "127.0.0.1:9000";

#[derive(Parser, Debug)]
#[command(name = "cloud", version, about = "Client of the cloudinfra job cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Deploy a job: an archive (.tar.gz with a makefile whose `run` target
    /// runs it) or a directory (packed on the fly), on REPLICAS nodes.
    /// Prints "Job ticket#: N".
    Deploy(DeployArgs),
    /// Show a job's state and one line per replica.
    Status(StatusArgs),
    /// Wait for every replica, write DIR/output_PORT.txt for each, then
    /// close the ticket. Without DIR: close the ticket at once (running
    /// replicas are killed, outputs discarded).
    Retrieve(RetrieveArgs),
}

#[derive(clap::Args, Debug)]
#[command(about = "Deploy a job: cloud deploy <replicas> <archive.tar.gz | directory>")]
struct DeployArgs {
    /// Number of replicas (1 to the number of nodes).
    replicas: u32,
    /// A .tar.gz of sources with a makefile, or a directory to pack.
    archive: PathBuf,
    /// When one replica fails (nonzero exit, setup error, limit), stop the
    /// others; they are reported "stopped: replica i failed".
    #[arg(long)]
    fail_fast: bool,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(clap::Args, Debug)]
#[command(about = "Show a job's status: cloud status <ticket> [--json]")]
struct StatusArgs {
    /// The ticket number deploy printed.
    ticket: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(clap::Args, Debug)]
#[command(about = "Collect outputs: cloud retrieve <ticket> [<dir>]")]
struct RetrieveArgs {
    /// The ticket number deploy printed.
    ticket: u32,
    /// Directory for output_PORT.txt files; omit it to close the ticket now.
    dir: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(clap::Args, Debug)]
struct ServerArg {
    /// Main server address, HOST:PORT: the one on cloud-server's ready line
    /// ("listening on ...").
    #[arg(long, env = "CLOUD_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Give up when the server makes no progress for SECS seconds (0: wait
    /// forever). Default: 60 for deploy, status and close; no limit while
    /// retrieve waits for a job (TCP keepalive still notices a dead server).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

impl ServerArg {
    /// The timeout to use, given the command's default.
    fn timeout_or(&self, default: Option<Duration>) -> Option<Duration> {
        match self.timeout {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None => default,
        }
    }
}

fn main() -> ExitCode {
    let mut argv: Vec<String> = std::env::args().collect();
    let invoked = argv.first().map(|a| Path::new(a).file_name().map(|f| f.to_string_lossy().into_owned()));
    // Called as `deploy`, `status` or `retrieve`: treat the name as the subcommand.
    let applet = invoked.flatten().filter(|n| matches!(n.as_str(), "deploy" | "status" | "retrieve"));
    if let Some(name) = &applet {
        argv[0] = name.clone();
        argv.insert(0, "cloud".into());
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e, applet.as_deref()),
    };
    let (name, result) = match cli.command {
        Command::Deploy(a) => ("deploy", deploy(a)),
        Command::Status(a) => ("status", status(a)),
        Command::Retrieve(a) => ("retrieve", retrieve(a)),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{name}: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// clap's errors take several lines; ours take one: what is wrong, the
/// usage, and where to read more. Help and version print as clap does.
/// `applet`: the program was called as `deploy`, `status` or `retrieve`.
fn usage_error(e: clap::Error, applet: Option<&str>) -> ExitCode {
    use clap::error::ErrorKind::*;
    let mut text = e.render().to_string();
    if let Some(name) = applet {
        // Show the usage as it is typed: `deploy ...`, not `cloud deploy ...`.
        text = text.replace(&format!("cloud {name}"), name);
    }
    match e.kind() {
        DisplayHelp | DisplayVersion => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{text}");
            ExitCode::from(2)
        }
        _ => {
            eprintln!("{}: {}", applet.unwrap_or("cloud"), one_line(&text));
            ExitCode::from(2)
        }
    }
}

/// Join clap's error lines into one: "error: " and the pointer to --help
/// dropped, listed arguments kept on their line, "(see --help)" added.
fn one_line(text: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        match parts.last_mut() {
            Some(last) if line.starts_with('<') || (line.starts_with("--") && last.ends_with(':')) => {
                last.push(' ');
                last.push_str(line);
            }
            _ => parts.push(line.to_string()),
        }
    }
    format!("{} (see --help)", parts.join("; "))
}

fn connect(s: &ServerArg) -> Result<Client, String> {
    Client::connect_with(&s.server, s.timeout_or(Some(DEFAULT_TIMEOUT))).map_err(|e| e.to_string())
}

fn deploy(a: DeployArgs) -> Result<ExitCode, String> {
    let meta = fs::metadata(&a.archive).map_err(|e| format!("cannot open {}: {e}", a.archive.display()))?;
    let (file, len) = if meta.is_dir() {
        has_makefile(&a.archive)?;
        pack_directory(&a.archive).map_err(|e| format!("cannot pack directory {}: {e}", a.archive.display()))?
    } else {
        let f = File::open(&a.archive).map_err(|e| format!("cannot open {}: {e}", a.archive.display()))?;
        looks_gzip(&f, &a.archive)?;
        (f, meta.len())
    };
    if len > u64::from(u32::MAX) {
        return Err(format!("{} is {len} bytes; an archive must be under 4 GiB", a.archive.display()));
    }
    let mut client = connect(&a.server)?;
    let ticket = if a.fail_fast {
        client.deploy_opts(a.replicas, cloudinfra::proto::DEPLOY_FAIL_FAST, file, len)
    } else {
        client.deploy(a.replicas, file, len)
    }
    .map_err(|e| e.to_string())?;
    println!("Job ticket#: {ticket}");
    Ok(ExitCode::SUCCESS)
}

/// A directory to pack must have a makefile at its top (the server would
/// refuse the archive anyway; here we can name the directory to deploy).
fn has_makefile(dir: &Path) -> Result<(), String> {
    // A symlinked or odd Makefile is left to the server, which says what is wrong with it.
    if MAKEFILE_NAMES.iter().any(|n| fs::symlink_metadata(dir.join(n)).is_ok()) {
        return Ok(());
    }
    let sub = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && MAKEFILE_NAMES.iter().any(|n| p.join(n).is_file()))
        .min();
    Err(match sub {
        Some(sub) => format!(
            "{} has no Makefile at its top (make run needs one); did you mean: deploy N {}",
            dir.display(),
            sub.display()
        ),
        None => format!("{} has no Makefile (make run needs one with a `run` target)", dir.display()),
    })
}

/// Refuse before uploading what cannot be a .tar.gz (the server checks
/// the rest as it arrives, and answers CLOUD_BAD_ARCHIVE with the reason).
fn looks_gzip(mut f: &File, path: &Path) -> Result<(), String> {
    use std::io::{Read, Seek};
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    f.rewind().map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match (n, magic) {
        (0, _) => Err(format!("bad archive: {} is empty (deploy expects a .tar.gz)", path.display())),
        (2, [0x1f, 0x8b]) => Ok(()),
        _ => Err(format!("bad archive: {} is not a gzip file (deploy expects a .tar.gz)", path.display())),
    }
}

fn status(a: StatusArgs) -> Result<ExitCode, String> {
    let mut client = connect(&a.server)?;
    let st = client.status(a.ticket).map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", status_json(&st));
    } else {
        print!("{}", status_text(&st));
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(st: &JobStatus) -> serde_json::Value {
    serde_json::json!({
        "ticket": st.ticket,
        "status": st.state.name(),
        "queue_position": st.queue_position,
        "replicas": st.replicas.iter().map(|r| serde_json::json!({
            "replica": r.replica,
            "node": r.node,
            "status": r.state.name(),
            "exit_code": r.exit_code,
            "message": r.message,
        })).collect::<Vec<_>>(),
    })
}

fn status_text(st: &JobStatus) -> String {
    let mut out = format!("ticket {}: {}", st.ticket, st.state.name());
    if st.state == JobState::Waiting {
        out.push_str(&format!(" (queue position {})", st.queue_position));
    }
    out.push('\n');
    for r in &st.replicas {
        let node = if r.node.is_empty() { "-" } else { &r.node };
        let code = if r.state.is_final() { r.exit_code.to_string() } else { "-".into() };
        let line = format!("  replica {}  {node}  {}  exit {code}  {}", r.replica, r.state.name(), r.message);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn retrieve(a: RetrieveArgs) -> Result<ExitCode, String> {
    let Some(dir) = a.dir else {
        let mut client = connect(&a.server)?;
        client.close(a.ticket).map_err(|e| e.to_string())?;
        println!("ticket {} closed", a.ticket);
        return Ok(ExitCode::SUCCESS);
    };
    // Waiting for a job has no time limit unless asked for.
    let mut client = Client::connect_with(&a.server.server, a.server.timeout_or(None)).map_err(|e| e.to_string())?;
    // Outputs stream into .part files; each is fsynced and renamed into
    // place, and only then is the ticket closed. The directory is made only
    // once the server has said OK: an unknown ticket leaves nothing behind.
    let part = |s: &ReplicaStatus| {
        let _ = fs::create_dir_all(&dir);
        dir.join(format!("output_{}.txt.part", port_of(&s.node)))
    };
    let outputs = client.retrieve_into(a.ticket, true, part).map_err(|e: ClientError| e.to_string())?;
    let remove_parts = || {
        for (_, part) in &outputs {
            let _ = fs::remove_file(part);
        }
    };
    let mut all_ok = true;
    for (s, part) in &outputs {
        let path = part.with_extension("");
        commit(part, &path).map_err(|e| {
            remove_parts();
            format!("cannot write {}: {e}; the ticket stays open, retry", path.display())
        })?;
        println!(
            "replica {} ({}): {} (exit {}) {} -> {}",
            s.replica,
            s.node,
            s.state.name(),
            s.exit_code,
            s.message,
            path.display()
        );
        all_ok &= s.state == JobState::Completed;
    }
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    client.set_timeout(a.server.timeout_or(Some(DEFAULT_TIMEOUT))).map_err(|e| e.to_string())?;
    client.close(a.ticket).map_err(|e| e.to_string())?;
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The port of "127.0.0.1:9001", for the original output_PORT.txt naming.
fn port_of(node: &str) -> &str {
    node.rsplit(':').next().filter(|p| !p.is_empty()).unwrap_or("unknown")
}

/// fsync a finished .part file and rename it into place.
fn commit(part: &Path, path: &Path) -> std::io::Result<()> {
    File::open(part)?.sync_all()?;
    fs::rename(part, path)
}
