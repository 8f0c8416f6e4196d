//! `cloud`: the client programs. Called as `deploy`, `status` or `retrieve`
//! (links to this binary, as in the original), or as `cloud <command>`.
//!
//! Exit codes (every command): 0 success, and for a command that waits for
//! a job (`status --wait`, `deploy --wait`, `retrieve DIR`), every replica
//! COMPLETED; 1 an error (the server refused the call, or could not be
//! reached: the message says which and what to do); 2 a usage error; 3 the
//! job ended and some replica FAILED (make exited non-zero); 4 some replica
//! was KILLED, LOST or had a SETUP_ERROR (4 wins over 3; `status` shows why).
//!
//! Start-up is kept lean (a user pays two of these processes per job): the
//! binary is linked statically (build.rs), enters at the C `main` below
//! (skipping Rust's runtime set-up), and parses the common forms without
//! building clap's command tree (`quick_parse`); docs/PERFORMANCE.md has
//! the figures.

// Not under `cargo test`: the bin's (empty) test harness brings its own main.
#![cfg_attr(not(test), no_main)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cloudinfra::archive_check::MAKEFILE_NAMES;
use cloudinfra::client::{pack_directory, Client, ClientError, DEFAULT_TIMEOUT};
use cloudinfra::proto::{ClusterView, JobInfo, JobState, NodeState, Outcome, ReplicaStatus, TicketInfo};

const DEFAULT_SERVER: &str = "127.0.0.1:9000";

/// `print!` for everything this program writes to stdout. SIGPIPE is
/// ignored here (a server that goes away mid-`sendfile` must be an error
/// message, not a silent death), so a reader that stops early (`cloud
/// --help | head -1`, `cloud status | true`) makes the write fail with
/// EPIPE, where `print!` would panic. This ends the program the way a C
/// tool ends there: by SIGPIPE, quietly, status 141 in the shell.
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// `println!`, as `out!`.
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let written = std::io::stdout().lock().write_fmt(args);
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
        let name = COMMAND_NAME.get().copied().unwrap_or("cloud");
        eprintln!("{name}: cannot write to stdout: {e}; check where its output goes (a full disk, a closed file)");
        std::process::exit(1);
    }
}

/// The command being run (`deploy`, `status`, ...), for the one message
/// that is not returned to `run`: a failed write to stdout.
static COMMAND_NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The reader of stdout is gone: end as an unhandled SIGPIPE would.
fn die_of_sigpipe() -> ! {
    use nix::sys::signal::{raise, signal, SigHandler, SIGPIPE};
    // SAFETY: SIG_DFL installs no handler of ours; nothing else runs now.
    let _ = unsafe { signal(SIGPIPE, SigHandler::SigDfl) };
    let _ = raise(SIGPIPE);
    std::process::exit(141)
}

/// The job ended and some replica FAILED (make exited non-zero).
const EXIT_JOB_FAILED: u8 = 3;
/// The job ended and some replica was KILLED, LOST, or had a SETUP_ERROR.
const EXIT_JOB_KILLED: u8 = 4;

const EXIT_CODES: &str = "Exit codes: 0 success (for a command that waits for a job: every replica COMPLETED); \
1 an error (refused by the server, or the server cannot be reached); 2 a usage error; \
3 the job ended and some replica FAILED (make run exited non-zero); \
4 the job ended and some replica was KILLED (signal, time or resource limit, cancel), LOST (its node) \
or had a SETUP_ERROR (bad archive, no make). 4 wins over 3.";

#[derive(Parser, Debug)]
#[command(name = "cloud", version, about = "Client of the cloudinfra job cluster", after_help = EXIT_CODES)]
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
    /// Show a job's state and one line per replica; without a ticket, the
    /// cluster (nodes, wait queue, totals); --mine: your tickets.
    Status(StatusArgs),
    /// Wait for every replica, write DIR/output_PORT.txt for each, then
    /// close the ticket. Without DIR: close the ticket at once (running
    /// replicas are killed, outputs discarded).
    Retrieve(RetrieveArgs),
    /// Stop a job: running replicas are killed, waiting ones never start;
    /// outputs are kept for a later retrieve.
    Cancel(CancelArgs),
}

#[derive(clap::Args, Debug)]
#[command(
    about = "Deploy a job: cloud deploy <replicas> <archive.tar.gz | directory>",
    after_help = concat!(
        "Examples:\n  cloud deploy 2 job.tar.gz\n  cloud deploy 1 ./myjob --wait      ",
        "# deploy, wait, write ./ticket_N/output_PORT.txt, close\n  cloud deploy 1 job.tar.gz --json\n\n",
        "Exit codes: 0 deployed (with --wait: every replica COMPLETED); 1 an error; 2 a usage error; ",
        "3 (--wait) some replica FAILED; 4 some replica was KILLED, LOST or had a SETUP_ERROR."
    )
)]
struct DeployArgs {
    /// Number of replicas (1 to the number of nodes).
    replicas: u32,
    /// A .tar.gz of sources with a makefile, or a directory to pack.
    archive: PathBuf,
    /// When one replica fails (nonzero exit, setup error, limit), stop the
    /// others; they are reported "stopped: replica i failed".
    #[arg(long)]
    fail_fast: bool,
    /// Wait for the job, write its outputs into ./ticket_N/ (./ticket_N-2/
    /// if that one is there already), close it.
    #[arg(long)]
    wait: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(clap::Args, Debug)]
#[command(
    about = "Show a job's status: cloud status [<ticket>] [--mine] [--wait] [--json]",
    after_help = concat!(
        "Examples:\n  cloud status            # the cluster: nodes, wait queue, totals\n",
        "  cloud status --mine     # your tickets, with state and age\n",
        "  cloud status 7          # ticket 7, one line per replica\n",
        "  cloud status 7 --wait   # block until ticket 7 ends; exit with its outcome\n",
        "  cloud status --json\n\n",
        "Exit codes: 0 success (with --wait: every replica COMPLETED); 1 an error; 2 a usage error; ",
        "3 (--wait) some replica FAILED; 4 some replica was KILLED, LOST or had a SETUP_ERROR."
    )
)]
struct StatusArgs {
    /// The ticket number deploy printed; omit it for the whole cluster.
    ticket: Option<u32>,
    /// Your own tickets (as the server identifies you) instead of the cluster.
    #[arg(long, conflicts_with = "ticket")]
    mine: bool,
    /// Wait until the job has ended (no time limit unless --timeout).
    #[arg(long, requires = "ticket", conflicts_with = "mine")]
    wait: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(clap::Args, Debug)]
#[command(
    about = "Collect outputs: cloud retrieve <ticket> [<dir>]",
    after_help = concat!(
        "Examples:\n  cloud retrieve 7 out     # wait, write out/output_PORT.txt per replica, close\n",
        "  cloud retrieve 7 out --sync   # the same, the files fsynced before the close\n",
        "  cloud retrieve 7         # close ticket 7 now, discarding its outputs (says what)\n",
        "  cloud retrieve 7 --follow --replica 1   # print replica 1's output as it is produced\n\n",
        "Exit codes: 0 success (with DIR: every replica COMPLETED); 1 an error; 2 a usage error; ",
        "3 some replica FAILED; 4 some replica was KILLED, LOST or had a SETUP_ERROR."
    )
)]
struct RetrieveArgs {
    /// The ticket number deploy printed.
    ticket: u32,
    /// Directory for output_PORT.txt files; omit it to close the ticket now.
    #[arg(conflicts_with = "follow")]
    dir: Option<PathBuf>,
    /// Print a replica's output to stdout as it is produced, until it ends
    /// (the ticket stays open).
    #[arg(long)]
    follow: bool,
    /// Which replica --follow shows.
    #[arg(long, default_value_t = 0, requires = "follow")]
    replica: u32,
    /// Make the outputs durable before closing the ticket: fsync each file
    /// and DIR, so that they survive a power loss or a kernel crash as
    /// soon as retrieve returns (after it, these files are the only copy).
    /// Without it the kernel writes them back in its own time, as after cp
    /// or tar: typically within 30 s.
    #[arg(long, requires = "dir", conflicts_with = "follow")]
    sync: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(clap::Args, Debug)]
#[command(
    about = "Stop a job, keep its outputs: cloud cancel <ticket>",
    after_help = concat!(
        "Examples:\n  cloud cancel 7 && cloud retrieve 7 out   # stop it, then collect what it printed\n\n",
        "Running replicas end KILLED (killed: cancelled); waiting ones never start.\n",
        "Exit codes: 0 cancelled (or had already ended); 1 an error; 2 a usage error."
    )
)]
struct CancelArgs {
    /// The ticket number deploy printed.
    ticket: u32,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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

/// The process's entry, called by the C library's start-up code. Rust's own
/// (`std`'s `lang_start`) would first read /proc/self/maps to place a stack
/// guard and set up an alternate signal stack: an eighth of this program's
/// start-up CPU. Of what it does, we keep what the client needs: stdin,
/// stdout and stderr open, SIGPIPE ignored, stdout flushed at the end, and
/// a panic reported (by the panic hook) and turned into exit status 101.
/// The arguments are read from `argv` here: only glibc also hands them to
/// `std::env::args` without `lang_start`, and this program is built for
/// musl as well (README, "The client program and musl").
///
/// # Safety
/// Called by the C start-up code alone, with the `argc` and `argv` it was
/// given by `execve`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    use nix::sys::signal::{signal, SigHandler, SIGPIPE};
    stdio_open();
    // SAFETY: SIG_IGN runs no code of ours in a signal handler, and nothing
    // else in this process installs a handler for SIGPIPE.
    let _ = unsafe { signal(SIGPIPE, SigHandler::SigIgn) };
    let args: Vec<&std::ffi::CStr> = (0..usize::try_from(argc).unwrap_or(0))
        // SAFETY: the C start-up passes `argc` valid pointers to
        // NUL-terminated strings in `argv`, alive for the whole process.
        .map(|i| unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) })
        .collect();
    let code = match args.iter().map(|a| a.to_str().map(str::to_owned)).collect::<Result<Vec<String>, _>>() {
        Ok(args) => std::panic::catch_unwind(|| run(args)).unwrap_or(ExitCode::from(101)),
        Err(_) => {
            let name = args.first().map(|a| a.to_string_lossy()).unwrap_or_default();
            let name = applet(&name).unwrap_or("cloud");
            eprintln!("{name}: an argument is not valid UTF-8; give names and paths in UTF-8");
            ExitCode::from(2)
        }
    };
    if let Err(e) = std::io::Write::flush(&mut std::io::stdout()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
    }
    (0..=u8::MAX).find(|&n| ExitCode::from(n) == code).map_or(1, libc::c_int::from)
}

/// Under `cargo test` an ordinary main (the harness replaces it).
#[cfg(test)]
fn main() -> ExitCode {
    run(std::env::args().collect())
}

/// As Rust's start-up does: a closed stdin, stdout or stderr is opened on
/// /dev/null, so that no socket or file opened later takes its number and
/// receives what we print.
#[cfg(not(test))]
fn stdio_open() {
    use std::os::fd::IntoRawFd;
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd { fd, events: 0, revents: 0 });
    // SAFETY: `fds` is an array of 3 initialised pollfd, the length passed;
    // poll(2) only writes their `revents`. A closed fd is reported as
    // POLLNVAL, not as an error; no fd is borrowed or closed.
    if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) } < 0 {
        return;
    }
    for _ in fds.iter().filter(|f| f.revents & libc::POLLNVAL != 0) {
        // open(2) takes the lowest free number: the closed one.
        if let Ok(null) = fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
            let _ = null.into_raw_fd();
        }
    }
}

fn run(mut argv: Vec<String>) -> ExitCode {
    // Called as `deploy`, `status`, `retrieve` or `cancel`: treat the name as the subcommand.
    let called_as = argv.first().and_then(|a| applet(a));
    if let Some(name) = called_as {
        argv[0] = name.into();
        argv.insert(0, "cloud".into());
    }
    let command = match quick_parse(&argv) {
        Some(command) => command,
        None => match Cli::try_parse_from(&argv) {
            Ok(cli) => cli.command,
            Err(e) => return usage_error(e, called_as),
        },
    };
    let name = match &command {
        Command::Deploy(_) => "deploy",
        Command::Status(_) => "status",
        Command::Retrieve(_) => "retrieve",
        Command::Cancel(_) => "cancel",
    };
    let _ = COMMAND_NAME.set(name);
    let result = match command {
        Command::Deploy(a) => deploy(a),
        Command::Status(a) => status(a),
        Command::Retrieve(a) => retrieve(a),
        Command::Cancel(a) => cancel(a),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{name}: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The subcommand this program was called as (`argv[0]` a link named
/// `deploy`, `status`, `retrieve` or `cancel`), if any.
fn applet(argv0: &str) -> Option<&'static str> {
    let name = Path::new(argv0).file_name()?;
    ["deploy", "status", "retrieve", "cancel"].into_iter().find(|&a| name == a)
}

/// The common forms (`deploy N ARCHIVE`, `status [T]`, `retrieve T [DIR]`,
/// `cancel T`, each with or without one `--server ADDR`), parsed without
/// building clap's command tree, which is a fifth of this program's
/// start-up (0.1 ms of CPU, 19 page faults). Anything else (another option,
/// `--help`, a value that does not parse, an empty CLOUD_SERVER) is None,
/// and clap parses it; where this answers, it answers as clap would (the
/// tests below compare the two).
fn quick_parse(argv: &[String]) -> Option<Command> {
    let mut args: Vec<&String> = Vec::new();
    let mut given: Option<&str> = None;
    let mut rest = argv.get(2..)?.iter();
    while let Some(a) = rest.next() {
        let value = match a.strip_prefix("--server") {
            Some("") => rest.next().map(String::as_str),
            Some(v) => Some(v.strip_prefix('=')?),
            None => {
                if a.is_empty() || a.starts_with('-') {
                    return None;
                }
                args.push(a);
                continue;
            }
        };
        match value {
            Some(v) if given.is_none() && !v.is_empty() && !v.starts_with('-') => given = Some(v),
            _ => return None,
        }
    }
    let server = || -> Option<ServerArg> {
        let server = match (given, std::env::var_os("CLOUD_SERVER")) {
            (Some(v), _) => v.to_string(),
            (None, None) => DEFAULT_SERVER.to_string(),
            (None, Some(v)) => v.into_string().ok().filter(|s| !s.is_empty())?,
        };
        Some(ServerArg { server, timeout: None })
    };
    let num = |s: &String| s.parse::<u32>().ok();
    Some(match (argv.get(1)?.as_str(), args.as_slice()) {
        ("deploy", [n, archive]) => Command::Deploy(DeployArgs {
            replicas: num(n)?,
            archive: PathBuf::from(archive),
            fail_fast: false,
            wait: false,
            json: false,
            server: server()?,
        }),
        ("status", []) => {
            Command::Status(StatusArgs { ticket: None, mine: false, wait: false, json: false, server: server()? })
        }
        ("status", [t]) => Command::Status(StatusArgs {
            ticket: Some(num(t)?),
            mine: false,
            wait: false,
            json: false,
            server: server()?,
        }),
        ("retrieve", [t]) | ("retrieve", [t, _]) => Command::Retrieve(RetrieveArgs {
            ticket: num(t)?,
            dir: args.get(1).map(PathBuf::from),
            follow: false,
            replica: 0,
            sync: false,
            json: false,
            server: server()?,
        }),
        ("cancel", [t]) => Command::Cancel(CancelArgs { ticket: num(t)?, json: false, server: server()? }),
        _ => return None,
    })
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
            out!("{text}");
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

/// A connection for a call that waits for a job: no time limit unless asked.
fn connect_waiting(s: &ServerArg) -> Result<Client, String> {
    Client::connect_with(&s.server, s.timeout_or(None)).map_err(|e| e.to_string())
}

/// 0 if every replica completed, else EXIT_JOB_KILLED or EXIT_JOB_FAILED.
fn outcome(info: &JobInfo) -> ExitCode {
    let kinds = || info.replicas.iter().map(|r| r.kind);
    if kinds().any(|k| matches!(k, Outcome::Killed | Outcome::Lost | Outcome::SetupError)) {
        ExitCode::from(EXIT_JOB_KILLED)
    } else if info.job.replicas.iter().all(|r| r.state == JobState::Completed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_JOB_FAILED)
    }
}

/// Unix seconds `age` seconds ago, null for -1 (not yet).
fn when(age: i32) -> Option<u64> {
    u32::try_from(age).ok().map(since)
}

/// "5s", "3m20s", "2h05m".
fn age(secs: u32) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Unix seconds `secs` ago.
fn since(secs: u32) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    now.saturating_sub(u64::from(secs))
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
    let bar = progress_bar(len);
    if let Some(bar) = bar.clone() {
        client.on_progress(move |sent| bar.set_position(sent.min(len)));
    }
    let deployed = if a.fail_fast {
        client.deploy_opts(a.replicas, cloudinfra::proto::DEPLOY_FAIL_FAST, file, len)
    } else {
        client.deploy(a.replicas, file, len)
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let ticket = deployed.map_err(|e| e.to_string())?;
    let line = match a.json {
        true => serde_json::json!({ "ticket": ticket }).to_string(),
        false => format!("Job ticket#: {ticket}"),
    };
    if !a.wait || !a.json {
        // The job runs whatever happens to stdout: its number must not be
        // lost with it (`> /dev/full`, a reader gone).
        let written = {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{line}").and_then(|()| stdout.flush())
        };
        if let Err(e) = written {
            eprintln!("deploy: the job was accepted as ticket {ticket}, but stdout failed ({e}); `cloud status {ticket}` shows it");
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                die_of_sigpipe();
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    collect(ticket, &fresh_ticket_dir(ticket), &a.server, a.json, false)
}

/// `./ticket_N`, or `./ticket_N-2`, `-3`, ... where one is there already
/// (ticket numbers start again on a new work dir): a job's outputs never
/// mix with an earlier job's files.
fn fresh_ticket_dir(ticket: u32) -> PathBuf {
    let base = format!("ticket_{ticket}");
    std::iter::once(PathBuf::from(&base))
        .chain((2..1000).map(|i| PathBuf::from(format!("{base}-{i}"))))
        .find(|p| p.symlink_metadata().is_err())
        .unwrap_or_else(|| PathBuf::from(&base))
}

/// Archives at least this big show a progress bar (on a terminal).
const PROGRESS_FROM: u64 = 4 << 20;

/// A progress bar with bytes and rate on stderr, only when stderr is a
/// terminal and the upload is large enough to be worth one.
fn progress_bar(len: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if len < PROGRESS_FROM || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    let style =
        indicatif::ProgressStyle::with_template("uploading {bytes}/{total_bytes} {bytes_per_sec} [{wide_bar}] {eta}")
            .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    Some(bar)
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
    let Some(ticket) = a.ticket else {
        let mut client = connect(&a.server)?;
        if a.mine {
            let mine = client.mine().map_err(|e| e.to_string())?;
            if a.json {
                outln!("{}", mine_json(&mine));
            } else {
                out!("{}", mine_text(&mine));
            }
        } else {
            let view = client.cluster().map_err(|e| e.to_string())?;
            if a.json {
                outln!("{}", cluster_json(&view));
            } else {
                out!("{}", cluster_text(&view));
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let (st, code) = if a.wait {
        let info = connect_waiting(&a.server)?.info(ticket, true).map_err(|e| e.to_string())?;
        let code = outcome(&info);
        (info, code)
    } else {
        (connect(&a.server)?.info(ticket, false).map_err(|e| e.to_string())?, ExitCode::SUCCESS)
    };
    if a.json {
        outln!("{}", status_json(&st));
    } else {
        out!("{}", status_text(&st));
    }
    Ok(code)
}

fn cluster_json(v: &ClusterView) -> serde_json::Value {
    let count = |s: NodeState| v.nodes.iter().filter(|n| n.state == s).count();
    serde_json::json!({
        "nodes": v.nodes.iter().map(|n| serde_json::json!({
            "name": n.name,
            "state": n.state.name(),
            "slots": 1,
            "running": if n.state == NodeState::Busy {
                vec![serde_json::json!({"ticket": n.ticket, "replica": n.replica, "since": since(n.age)})]
            } else {
                vec![]
            },
            "since": (n.state == NodeState::Down).then(|| since(n.age)),
        })).collect::<Vec<_>>(),
        "queue": v.queue.iter().map(|q| serde_json::json!({
            "ticket": q.ticket,
            "replicas": q.replicas,
            "position": q.position,
            "owner": (q.owner >= 0).then_some(q.owner),
            "submitted": since(q.age),
        })).collect::<Vec<_>>(),
        "totals": {
            "nodes": v.nodes.len(),
            "free": count(NodeState::Free),
            "busy": count(NodeState::Busy),
            "down": count(NodeState::Down),
            "waiting": v.queue.len(),
            "running": v.running_jobs,
            "finished": v.finished_jobs,
            "jobs": v.jobs,
        },
    })
}

fn cluster_text(v: &ClusterView) -> String {
    let mut out = String::from("NODE                   STATE  TICKET  REPLICA  SINCE\n");
    for n in &v.nodes {
        let line = match n.state {
            NodeState::Busy => {
                format!("{:<22} {:<6} {:<7} {:<8} {} ago", n.name, "busy", n.ticket, n.replica, age(n.age))
            }
            NodeState::Down => format!("{:<22} {:<6} {:<7} {:<8} {} ago", n.name, "down", "-", "-", age(n.age)),
            NodeState::Free => format!("{:<22} {:<6} {:<7} {:<8} -", n.name, "free", "-", "-"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if v.queue.is_empty() {
        out.push_str("queue: empty\n");
    } else {
        out.push_str("QUEUE  TICKET  REPLICAS  OWNER   WAITING\n");
        for q in &v.queue {
            let owner = if q.owner >= 0 { format!("uid {}", q.owner) } else { "-".into() };
            out.push_str(&format!("{:<6} {:<7} {:<9} {:<7} {}\n", q.position, q.ticket, q.replicas, owner, age(q.age)));
        }
    }
    let count = |s: NodeState| v.nodes.iter().filter(|n| n.state == s).count();
    // A node with `slots=K` has a line per slot: count it once, and its
    // slots in the states.
    let names: std::collections::HashSet<&str> = v.nodes.iter().map(|n| n.name.as_str()).collect();
    let slots = match v.nodes.len() {
        n if n == names.len() => String::new(),
        n => format!(", {n} slots"),
    };
    out.push_str(&format!(
        "nodes: {}{slots} ({} free, {} busy, {} down); jobs: {} waiting, {} running, {} finished\n",
        names.len(),
        count(NodeState::Free),
        count(NodeState::Busy),
        count(NodeState::Down),
        v.queue.len(),
        v.running_jobs,
        v.finished_jobs
    ));
    out
}

fn mine_json(mine: &[TicketInfo]) -> serde_json::Value {
    serde_json::json!({
        "tickets": mine.iter().map(|t| serde_json::json!({
            "ticket": t.ticket,
            "status": t.state.name(),
            "replicas": t.replicas,
            "submitted": since(t.age),
            "age": t.age,
        })).collect::<Vec<_>>(),
    })
}

fn mine_text(mine: &[TicketInfo]) -> String {
    if mine.is_empty() {
        return "you hold no tickets\n".into();
    }
    let mut out = String::from("TICKET  STATE      REPLICAS  AGE\n");
    for t in mine {
        out.push_str(&format!("{:<7} {:<10} {:<9} {}\n", t.ticket, t.state.name(), t.replicas, age(t.age)));
    }
    out
}

fn status_json(info: &JobInfo) -> serde_json::Value {
    let st = &info.job;
    let none = proto_none();
    serde_json::json!({
        "ticket": st.ticket,
        "status": st.state.name(),
        "queue_position": st.queue_position,
        "submitted": when(info.submitted_age),
        "replicas": st.replicas.iter().enumerate().map(|(i, r)| {
            let x = info.replicas.get(i).unwrap_or(&none);
            serde_json::json!({
                "replica": r.replica,
                "node": (!r.node.is_empty()).then_some(&r.node),
                "status": r.state.name(),
                "outcome": x.kind.name(),
                "exit_code": (r.state.is_final() && r.exit_code >= 0).then_some(r.exit_code),
                "recipe_exit_code": (x.recipe_code >= 0).then_some(x.recipe_code),
                "started": when(x.started_age),
                "ended": when(x.ended_age),
                "message": r.message,
            })
        }).collect::<Vec<_>>(),
    })
}

/// What a replica that JOB_INFO did not describe shows.
fn proto_none() -> cloudinfra::proto::ReplicaInfo {
    cloudinfra::proto::ReplicaInfo { kind: Outcome::None, recipe_code: -1, started_age: -1, ended_age: -1 }
}

fn status_text(info: &JobInfo) -> String {
    let st = &info.job;
    let mut out = format!("ticket {}: {}", st.ticket, st.state.name());
    if st.state == JobState::Waiting {
        out.push_str(&format!(" (queue position {})", st.queue_position));
    }
    if let Ok(s) = u32::try_from(info.submitted_age) {
        out.push_str(&format!(", submitted {} ago", age(s)));
    }
    out.push('\n');
    let none = proto_none();
    for (i, r) in st.replicas.iter().enumerate() {
        let x = info.replicas.get(i).unwrap_or(&none);
        let node = if r.node.is_empty() { "-" } else { &r.node };
        let mut what = match x.kind.name() {
            Some(kind) => kind.to_string(),
            None => r.state.name().to_string(),
        };
        if r.state.is_final() && r.exit_code >= 0 {
            what.push_str(&format!(" exit {}", r.exit_code));
        }
        if x.recipe_code >= 0 {
            what.push_str(&format!(" (recipe exit {})", x.recipe_code));
        }
        let times = match (u32::try_from(x.started_age), u32::try_from(x.ended_age)) {
            (Ok(s), Ok(e)) => format!("ran {}, ended {} ago", age(s.saturating_sub(e)), age(e)),
            (Ok(s), Err(_)) => format!("running for {}", age(s)),
            (Err(_), Ok(e)) => format!("ended {} ago", age(e)),
            _ => "waiting".into(),
        };
        let line = format!("  replica {}  {node}  {what}  {times}  {}", r.replica, r.message);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn retrieve(a: RetrieveArgs) -> Result<ExitCode, String> {
    if a.follow {
        return follow(&a);
    }
    let Some(dir) = a.dir else {
        let mut client = connect(&a.server)?;
        // Say what closing discards: ask first (STATUS is open to all).
        let st = client.status(a.ticket).ok();
        client.close(a.ticket).map_err(|e| e.to_string())?;
        let running = st.as_ref().map_or(0, |s| s.replicas.iter().filter(|r| r.state == JobState::Running).count());
        let ended = st.as_ref().map_or(0, |s| s.replicas.iter().filter(|r| r.state.is_final()).count());
        let waiting = st.as_ref().map_or(0, |s| s.replicas.iter().filter(|r| r.state == JobState::Waiting).count());
        if a.json {
            let j = serde_json::json!({"ticket": a.ticket, "closed": true,
                "discarded": {"ended": ended, "running": running, "waiting": waiting}});
            outln!("{j}");
        } else {
            outln!(
                "ticket {} closed: discarded the outputs of {ended} ended replica(s), killed {running} running, \
                 dropped {waiting} waiting (to keep outputs: cloud retrieve {} DIR)",
                a.ticket,
                a.ticket
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    collect(a.ticket, &dir, &a.server, a.json, a.sync)
}

/// Each reply is deferred by the server until there is output past the
/// offset or the replica has ended: nothing polls.
fn follow(a: &RetrieveArgs) -> Result<ExitCode, String> {
    use std::io::Write;
    let mut client = connect_waiting(&a.server)?;
    let mut offset = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let (data, ended) = client.follow(a.ticket, a.replica, offset).map_err(|e| e.to_string())?;
        offset += data.len() as u64;
        let mut written = Ok(());
        if a.json {
            if !data.is_empty() {
                let j =
                    serde_json::json!({"offset": offset - data.len() as u64, "data": String::from_utf8_lossy(&data)});
                written = writeln!(out, "{j}");
            }
        } else {
            written = out.write_all(&data);
        }
        match written.and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => die_of_sigpipe(),
            Err(e) => return Err(format!("cannot write to stdout: {e}")),
            Ok(()) => {}
        }
        if ended {
            break;
        }
    }
    drop(out);
    client.set_timeout(a.server.timeout_or(Some(DEFAULT_TIMEOUT))).map_err(|e| e.to_string())?;
    let info = client.info(a.ticket, false).map_err(|e| e.to_string())?;
    // The followed replica's own outcome.
    let i = a.replica as usize;
    let one = JobInfo {
        job: cloudinfra::proto::JobStatus {
            replicas: info.job.replicas.get(i).cloned().into_iter().collect(),
            ..info.job
        },
        submitted_age: info.submitted_age,
        replicas: info.replicas.get(i).cloned().into_iter().collect(),
    };
    Ok(outcome(&one))
}

fn cancel(a: CancelArgs) -> Result<ExitCode, String> {
    let mut client = connect(&a.server)?;
    // Say whether there was anything to cancel: ask first (STATUS is open
    // to all; CANCEL answers the same either way).
    let ended = client.status(a.ticket).ok().is_some_and(|st| st.replicas.iter().all(|r| r.state.is_final()));
    client.cancel(a.ticket).map_err(|e| e.to_string())?;
    if a.json {
        outln!("{}", serde_json::json!({"ticket": a.ticket, "cancelled": !ended, "already_ended": ended}));
    } else if ended {
        outln!(
            "ticket {} had already ended: nothing to cancel; its outputs are kept: cloud retrieve {} DIR",
            a.ticket,
            a.ticket
        );
    } else {
        outln!("ticket {} cancelled; its outputs are kept: cloud retrieve {} DIR", a.ticket, a.ticket);
    }
    Ok(ExitCode::SUCCESS)
}

/// Wait for `ticket`, write DIR/output_PORT.txt per replica, close it.
fn collect(ticket: u32, dir: &Path, server: &ServerArg, json: bool, sync: bool) -> Result<ExitCode, String> {
    // Waiting for a job has no time limit unless asked for.
    let mut client = connect_waiting(server)?;
    // Outputs stream into .part files, renamed into place once whole, and
    // only then is the ticket closed: after CLOSE these files are the only
    // copy. With --sync each is fsynced (by retrieve_into) and the
    // directory once, before the CLOSE. The directory is made only once
    // the server has said OK: an unknown ticket leaves nothing behind.
    let names = std::cell::RefCell::new(OutputNames::default());
    let part = |s: &ReplicaStatus| {
        let _ = fs::create_dir_all(dir);
        dir.join(format!("{}.txt.part", names.borrow_mut().name(s)))
    };
    let outputs = client.retrieve_into(ticket, true, sync, part).map_err(|e: ClientError| e.to_string())?;
    let remove_parts = || {
        for (_, part) in &outputs {
            let _ = fs::remove_file(part);
        }
    };
    let mut paths = Vec::new();
    for (_, part) in &outputs {
        let path = part.with_extension("");
        commit(part, &path).map_err(|e| {
            remove_parts();
            format!("cannot write {}: {e}; the ticket stays open, retry", path.display())
        })?;
        paths.push(path);
    }
    if sync {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}; the ticket stays open, retry", dir.display()))?;
    }
    client.set_timeout(server.timeout_or(Some(DEFAULT_TIMEOUT))).map_err(|e| e.to_string())?;
    // Outcome kinds and recipe codes (JOB_INFO) tell ends apart; a job
    // whose every replica COMPLETED (exited 0) has nothing more to say, and
    // the call is spared.
    let all_completed = outputs.iter().all(|(s, _)| s.state == JobState::Completed);
    let info = match all_completed {
        true => None,
        false => Some(client.info(ticket, false).map_err(|e| e.to_string())?),
    };
    client.close(ticket).map_err(|e| e.to_string())?;
    // Each replica's outcome kind (and the recipe's own code) with its output.
    let mut lines = Vec::new();
    for ((s, _), path) in outputs.iter().zip(&paths) {
        let extra = info.as_ref().and_then(|i| i.replicas.get(s.replica as usize));
        let kind = extra.and_then(|r| r.kind.name()).unwrap_or(s.state.name());
        let recipe = extra.map_or(-1, |r| r.recipe_code);
        if json {
            lines.push(serde_json::json!({"replica": s.replica, "node": s.node, "status": s.state.name(),
                "outcome": kind, "exit_code": s.exit_code,
                "recipe_exit_code": (recipe >= 0).then_some(recipe), "message": s.message, "output": path}));
        } else {
            let recipe = if recipe >= 0 { format!(", recipe exit {recipe}") } else { String::new() };
            outln!(
                "replica {} ({}): {kind} (exit {}{recipe}) {} -> {}",
                s.replica,
                s.node,
                s.exit_code,
                s.message,
                path.display()
            );
        }
    }
    if json {
        outln!("{}", serde_json::json!({"ticket": ticket, "replicas": lines}));
    }
    // An output the server could not get (its node restarted, or was
    // lost) is an empty file here: say so, and do not exit 0.
    let lost: Vec<u32> = outputs
        .iter()
        .filter(|(s, _)| s.message.contains("(output lost: ") || s.message.starts_with("node lost"))
        .map(|(s, _)| s.replica)
        .collect();
    let code = info.as_ref().map_or(ExitCode::SUCCESS, outcome);
    if !lost.is_empty() && code == ExitCode::SUCCESS {
        eprintln!(
            "retrieve: the output of replica(s) {lost:?} was lost (see the messages above); their files are empty"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}

/// Each replica's output file name in a retrieve's directory (without
/// `.txt`): `output_<port>`, the original naming, from its node's port
/// (a Slurm node's partition: `output_gpu`);
/// where that would name a second file (two nodes on different hosts with
/// the same port, or a replica that never ran on a node) `_replica<N>`
/// tells them apart: `output_9001_replica1`, `output_replica0`.
#[derive(Default)]
struct OutputNames {
    used: std::collections::HashSet<String>,
}

impl OutputNames {
    fn name(&mut self, s: &ReplicaStatus) -> String {
        // The node's port, or a Slurm node's partition (`slurm:gpu`); only
        // characters that cannot make a path of the name (the server says it).
        let safe = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_#".contains(&b));
        let port = s.node.rsplit_once(':').map(|(_, p)| p).filter(safe);
        let name = match port {
            Some(port) if !self.used.contains(&format!("output_{port}")) => format!("output_{port}"),
            Some(port) => format!("output_{port}_replica{}", s.replica),
            None => format!("output_replica{}", s.replica),
        };
        self.used.insert(name.clone());
        name
    }
}

/// Rename a finished .part file (fsynced as it was written with --sync) into place.
fn commit(part: &Path, path: &Path) -> std::io::Result<()> {
    fs::rename(part, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options that could only be ignored together are refused together.
    #[test]
    fn options_that_cannot_apply_together_are_usage_errors() {
        for argv in [
            &["cloud", "status", "--mine", "--wait"][..],
            &["cloud", "retrieve", "1", "d", "--follow", "--sync"],
            &["cloud", "retrieve", "1", "--sync"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?} parsed");
            assert!(quick_parse(&argv.iter().map(|s| s.to_string()).collect::<Vec<_>>()).is_none(), "{argv:?}");
        }
    }

    /// One file per replica: by port where the port is the replica's
    /// alone in this retrieval, else with the replica's number.
    #[test]
    fn output_names_tell_replicas_apart_when_ports_do_not() {
        let st = |replica: u32, node: &str| ReplicaStatus {
            replica,
            node: node.into(),
            state: JobState::Completed,
            exit_code: 0,
            message: String::new(),
        };
        let mut names = OutputNames::default();
        let got: Vec<String> = [
            st(0, "10.0.0.2:9001"),
            st(1, "10.0.0.3:9001"),
            st(2, "127.0.0.1:9002"),
            st(3, ""),
            st(4, "[::1]:9003"),
            st(5, "slurm:gpu"),
            st(6, "evil:../../x"),
        ]
        .iter()
        .map(|s| names.name(s))
        .collect();
        assert_eq!(
            got,
            [
                "output_9001",
                "output_9001_replica1",
                "output_9002",
                "output_replica3",
                "output_9003",
                "output_gpu",
                "output_replica6"
            ]
        );
    }

    /// Whatever `quick_parse` answers, clap answers the same.
    #[test]
    fn quick_parse_answers_as_clap_does() {
        let cases: &[&[&str]] = &[
            &["deploy", "1", "a.tar.gz"],
            &["deploy", "4", "dir/job"],
            &["deploy", "007", "a b.tar.gz"],
            &["deploy", "+2", "x"],
            &["deploy", "1"],
            &["deploy", "x", "a.tar.gz"],
            &["deploy", "4294967296", "a.tar.gz"],
            &["deploy", "1", "a.tar.gz", "extra"],
            &["deploy", "1", "a.tar.gz", "--wait"],
            &["deploy", "1", ""],
            &["status"],
            &["status", "7"],
            &["status", "7", "8"],
            &["status", "-1"],
            &["status", "--mine"],
            &["retrieve", "7"],
            &["retrieve", "7", "out"],
            &["retrieve", "7", "out", "more"],
            &["retrieve", "seven", "out"],
            &["retrieve", "7", "--follow"],
            &["cancel", "7"],
            &["cancel"],
            &["bogus", "1"],
            &["--version"],
            &["help", "deploy"],
            &["deploy", "1", "a.tar.gz", "--server", "127.0.0.1:9100"],
            &["status", "--server", "h:1", "7"],
            &["retrieve", "7", "out", "--server=h:1"],
            &["cancel", "--server=h:1", "7"],
            &["deploy", "1", "a.tar.gz", "--server"],
            &["deploy", "1", "a.tar.gz", "--server", "h:1", "--server", "h:2"],
            &["status", "--server", ""],
            &["status", "--server="],
            &["status", "--server", "-x"],
            &["status", "--serverx"],
            &["status", "--server", "h:1", "--json"],
        ];
        let mut quick = 0;
        for case in cases {
            let argv: Vec<String> = std::iter::once("cloud").chain(case.iter().copied()).map(String::from).collect();
            let Some(fast) = quick_parse(&argv) else {
                continue;
            };
            quick += 1;
            let clap =
                Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{case:?}: quick_parse answered, clap: {e}"));
            assert_eq!(format!("{fast:?}"), format!("{:?}", clap.command), "{case:?}");
        }
        assert_eq!(quick, 13, "the positional forms, with or without --server, take the quick path");
    }
}
