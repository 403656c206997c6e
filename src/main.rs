//! The `mandate` binary: command-line parsing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory as _, Parser, Subcommand};
use mandate::cli::client::{self, Answer, ApiCall, Output};
use mandate::config::{self, Config};
use mandate::{app, cli, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "mandate",
    version,
    about = "Runtime authorization sidecar for AI agents and workloads"
)]
struct Args {
    /// Configuration file.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH, env = "MANDATE_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar.
    #[command(after_help = "\
Environment:
  MANDATE_CONFIG             the configuration file (as --config)
  MANDATE_<SECTION>__<KEY>   sets one key of the file, array items by index; a value that
                             parses as TOML (number, boolean, array) is taken as one:
                               MANDATE_SERVER__LISTEN=127.0.0.1:9000
                               MANDATE_ISSUERS__0__LEEWAY=10s
                               MANDATE_STORE__URL=postgres://mandate@db/mandate
  RUST_LOG                   log filter, over log.level (not over --log-level)

Flags win over the environment, the environment over the file. A configuration problem
names where it came from: FILE:LINE, the variable, or the flag.")]
    Serve {
        /// TCP address to listen on, e.g. `127.0.0.1:9000` (`server.listen`; "" for none).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Policy bundle directory, relative to the working directory (`policy.bundle`).
        #[arg(long, value_name = "DIR")]
        bundle: Option<PathBuf>,
        /// Log filter, e.g. `info` or `mandate=debug` (`log.level`; wins over RUST_LOG).
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<String>,
        /// Log format (`log.format`).
        #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
        log_format: Option<String>,
    },
    /// Decide one request offline against a policy bundle (exit 0 allow, 2 deny, 3 escalate).
    Check {
        /// Bundle directory (default: the configured `policy.bundle`).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// `Type::id`, e.g. `Agent::agent-1`.
        #[arg(long)]
        principal: String,
        /// Principal attribute `key=value` (value parsed as JSON when possible); repeatable.
        #[arg(long = "principal-attr")]
        principal_attrs: Vec<String>,
        #[arg(long)]
        action: String,
        /// `Type::id`, e.g. `Account::acct-1`.
        #[arg(long)]
        resource: String,
        /// Resource attribute `key=value`; repeatable.
        #[arg(long = "resource-attr")]
        resource_attrs: Vec<String>,
        /// Context as a JSON object, e.g. `{"amount":250}`.
        #[arg(long)]
        context: Option<String>,
    },
    /// Policy bundle tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Request → action routes (`[[routes]]`) of the forward-auth endpoints.
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// The MCP gateway's tools.
    Mcp {
        #[command(subcommand)]
        command: McpCommand,
    },
    /// Local development helpers.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Grants, through a running server's API, with your own token.
    Grants {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: GrantsCommand,
    },
    /// Approval requests, through a running server's approvals API, with your own token.
    Approvals {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Print shell completions, e.g. `mandate completions bash > ~/.local/share/bash-completion/completions/mandate`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// How `approvals` and `grants` reach the server, and how they print its answers.
#[derive(Debug, clap::Args)]
struct Remote {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "MANDATE_SERVER",
        default_value = "http://127.0.0.1:8181"
    )]
    server: String,
    /// Your bearer token: an approver's to review, the requesting agent's to wait or cancel.
    #[arg(long, global = true, env = "MANDATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// `table`: aligned tables and summaries; `json`: the API's answer; `id`: only the ids
    /// (of requests; of grants for `grants list`; of the grant made for `approve`).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum GrantsCommand {
    /// Active grants of the requests you may see (`--all` includes expired and revoked).
    List {
        #[arg(long)]
        all: bool,
    },
    /// End a grant before its time: the same request escalates again.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum ApprovalsCommand {
    /// The requests you may review (pending, approved, denied, expired or cancelled).
    List {
        /// pending, approved, denied, expired or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only requests for this approver group.
        #[arg(long)]
        group: Option<String>,
    },
    /// One request in full, then the Cedar source of the policies that asked for approval;
    /// `--wait 30s` waits (at most 60 s) while it is pending and answers once it is decided.
    Show {
        id: String,
        #[arg(long)]
        wait: Option<String>,
    },
    /// Approve, with a rationale and the evidence the policy asks for (`--evidence ticket=FIN-1`).
    Approve {
        id: String,
        #[arg(long)]
        rationale: String,
        #[arg(long = "evidence")]
        evidence: Vec<String>,
        /// The binding hash `show` printed: the review is refused if the request is another.
        #[arg(long)]
        binding_hash: Option<String>,
    },
    /// Deny, with a rationale.
    Deny {
        id: String,
        #[arg(long)]
        rationale: String,
        /// The binding hash `show` printed: the review is refused if the request is another.
        #[arg(long)]
        binding_hash: Option<String>,
    },
    /// Withdraw your own pending request.
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check a log's hash chain across all its segments (FILE: the active file, `audit.path`;
    /// or the directory holding it; or one segment, checked on its own); prints the first
    /// broken or missing record and exits 1. With `--checkpoints` and `--key`, also checks the log against its signed checkpoints
    /// (a rewritten or cut-off log fails) and reports the last position they vouch for.
    Verify {
        file: PathBuf,
        /// The checkpoint file (`audit.checkpoint_file`; default: FILE.checkpoints).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        /// Read the checkpoints from the approval store at this URL instead (`store.url`:
        /// `postgres://…` or a SQLite file), where the log's writer cannot rewrite them.
        #[arg(long, conflicts_with = "checkpoints")]
        store: Option<String>,
        /// The checkpoint public key: a file holding it, or the key itself (32 bytes, hex or
        /// base64), as `mandate audit keygen` prints it.
        #[arg(long)]
        key: Option<String>,
    },
    /// Make an Ed25519 checkpoint signing key: the private key (PKCS#8 PEM) to FILE, the
    /// public key (hex) to FILE.pub and stdout.
    Keygen { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Load and strictly validate a bundle.
    Validate { dir: PathBuf },
    /// Run the bundle's `tests/*.yaml`; exit 1 on any failure.
    Test { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum RouteCommand {
    /// Which rule a request matches and the check it becomes, offline (the configuration's
    /// routes and bundle). Exit 0 when a rule or the default action matches, 2 when none does
    /// (the request would be denied: `no_route`).
    Test {
        /// The original request's method, e.g. `POST`.
        method: String,
        /// `/path?query`, or `https://host/path?query` to match `host` rules too.
        url: String,
        /// A header of the original request, `name=value`; repeatable.
        #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// The JSON body, e.g. `{"amount":250}`.
        #[arg(long)]
        body: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum McpCommand {
    /// Print a Cedar schema fragment with one action per tool of an MCP server
    /// (`mcp:<server>/<tool>`), its arguments typed from the tool's inputSchema.
    Schema {
        /// The server's `[[mcp.servers]]` name: asked for its tools/list, and the `<server>`
        /// of the action names.
        #[arg(long)]
        server: String,
        /// A saved tools/list result (JSON) to read instead of asking the server (a stdio
        /// server, or offline).
        #[arg(long, value_name = "FILE")]
        tools: Option<PathBuf>,
        /// The principal entity type the actions apply to.
        #[arg(long, default_value = "Agent")]
        principal_type: String,
    },
    /// Run a local stdio MCP server as a child with a running Mandate server's decisions
    /// between it and the agent's MCP client: `mandate mcp wrap --name tools -- python3
    /// server.py`. Every tools/call, resources/read and prompts/get is decided for the
    /// agent's token (or, over the Unix socket without one, for the local principal of the
    /// OS user this runs as) before the child sees it; the lists are filtered.
    #[command(after_help = "\
Environment:
  MANDATE_TOKEN    the agent's token (as --token); never passed on to the child
  MANDATE_SERVER   the server's base URL or unix:PATH (as --server)

Exit status: the child's (128 + N when signal N ended it). When Mandate cannot be asked,
a decided call is refused with a JSON-RPC error saying why; it never reaches the child.")]
    Wrap {
        /// The server's name in policies: its tools are `McpTool::\"<NAME>/<tool>\"`, a
        /// declared `mcp:<NAME>/<tool>` action their own. Not a `[[mcp.servers]]` name.
        #[arg(long)]
        name: String,
        /// The Mandate server's base URL, or `unix:PATH` for its Unix socket (where, without
        /// a token, the OS user this runs as is its `[[mcp.local_principals]]` entry).
        #[arg(long, env = "MANDATE_SERVER", default_value = "http://127.0.0.1:8181")]
        server: String,
        /// The agent's own workload token (default: MANDATE_TOKEN). Required unless
        /// `--server` is `unix:PATH`; sent there too when given.
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the agent's token, read again for every decision (a token a
        /// SPIFFE helper or the platform keeps fresh).
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// The stdio MCP server's command and arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Mint a token signed by the example configuration's dev key; prints only the token.
    Token {
        #[arg(long)]
        sub: String,
        /// Extra claim `key=value` (value parsed as JSON when possible); repeatable.
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// Lifetime, e.g. `15m`.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Issued this long ago, e.g. `--ttl 1m --age 5m` for a token that expired 4 minutes
        /// ago (past the 30 s leeway), to see how it is refused.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        age: Duration,
    },
}

impl Remote {
    fn call(self, call: ApiCall) -> anyhow::Result<u8> {
        let token = client::require_token(self.token)?;
        client::api(&self.server, &token, call, self.output)
    }
}

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Serve {
            listen,
            bundle,
            log_level,
            log_format,
        } => {
            // A relative `--bundle` is the operator's, from here (the file's are from its
            // directory).
            let bundle = bundle.map(|b| std::path::absolute(&b).unwrap_or(b));
            let flags: Vec<config::Override> = [
                ("--listen", "server.listen", listen),
                (
                    "--bundle",
                    "policy.bundle",
                    bundle.map(|b| b.to_string_lossy().into_owned()),
                ),
                ("--log-level", "log.level", log_level.clone()),
                ("--log-format", "log.format", log_format),
            ]
            .into_iter()
            .filter_map(|(flag, key, v)| v.map(|v| config::Override::flag(flag, key, v)))
            .collect();
            let cfg = match Config::load_with(&args.config, &flags) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            if log_level.is_some() {
                telemetry::init_over_rust_log(&cfg.log);
            } else {
                telemetry::init(&cfg.log);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            runtime.block_on(app::serve(cfg)).map(|()| 0)
        }
        Command::Check {
            bundle,
            principal,
            principal_attrs,
            action,
            resource,
            resource_attrs,
            context,
        } => {
            let bundle = match bundle {
                Some(b) => b,
                None => match load_config(&args.config) {
                    Ok(c) => c.policy.bundle,
                    Err(code) => return code,
                },
            };
            cli::check(&cli::CheckArgs {
                bundle: &bundle,
                principal: &principal,
                principal_attrs: &principal_attrs,
                action: &action,
                resource: &resource,
                resource_attrs: &resource_attrs,
                context: context.as_deref(),
            })
        }
        Command::Policy { command } => match command {
            PolicyCommand::Validate { dir } => cli::policy_validate(&dir),
            PolicyCommand::Test { dir } => cli::policy_test(&dir),
        },
        Command::Route {
            command:
                RouteCommand::Test {
                    method,
                    url,
                    headers,
                    body,
                },
        } => {
            let cfg = match load_config(&args.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            cli::route_test(
                &cfg,
                &cli::RouteTestArgs {
                    method: &method,
                    url: &url,
                    headers: &headers,
                    body: body.as_deref(),
                },
            )
        }
        Command::Mcp {
            command:
                McpCommand::Wrap {
                    name,
                    server,
                    token,
                    token_file,
                    command,
                },
        } => cli::wrap::Token::choose(token, token_file, std::env::var("MANDATE_TOKEN").ok())
            .and_then(|token| {
                cli::wrap::wrap(cli::wrap::WrapArgs {
                    name,
                    server,
                    token,
                    command,
                })
            }),
        Command::Mcp {
            command:
                McpCommand::Schema {
                    server,
                    tools,
                    principal_type,
                },
        } => {
            // A saved list needs no configuration; asking the server does.
            let cfg = match tools {
                Some(_) => None,
                None => match load_config(&args.config) {
                    Ok(c) => Some(c),
                    Err(code) => return code,
                },
            };
            cli::mcp_schema::schema(
                cfg.as_ref(),
                &cli::mcp_schema::SchemaArgs {
                    server: &server,
                    tools: tools.as_deref(),
                    principal_type: &principal_type,
                },
            )
        }
        Command::Dev { command } => match command {
            DevCommand::Token {
                sub,
                claims,
                ttl,
                age,
            } => {
                let cfg = match load_config(&args.config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                cli::dev_token(&cfg, &sub, &claims, ttl, age)
            }
        },
        Command::Audit { command } => match command {
            AuditCommand::Verify {
                file,
                checkpoints,
                store,
                key,
            } => {
                let source = match (checkpoints, store) {
                    (Some(f), _) => Some(cli::Checkpoints::File(f)),
                    (None, Some(url)) => Some(cli::Checkpoints::Store(url)),
                    (None, None) => None,
                };
                cli::audit_verify(&file, source, key.as_deref())
            }
            AuditCommand::Keygen { file } => cli::audit_keygen(&file),
        },
        Command::Grants { remote, command } => {
            let call = match command {
                GrantsCommand::List { all } => ApiCall::get("/v1/grants".into(), Answer::Grants)
                    .param("all", all.then(|| "true".to_owned())),
                GrantsCommand::Revoke { id } => {
                    ApiCall::post(format!("/v1/grants/{id}/revoke"), Answer::Grant)
                }
            };
            remote.call(call)
        }
        Command::Approvals { remote, command } => {
            let call = match command {
                ApprovalsCommand::List { status, group } => {
                    Ok(ApiCall::get("/v1/approvals".into(), Answer::Requests)
                        .param("status", status)
                        .param("group", group))
                }
                ApprovalsCommand::Show { id, wait } => Ok(ApiCall::get(
                    format!("/v1/approvals/{id}"),
                    Answer::RequestWithPolicies,
                )
                .param("wait", wait)),
                ApprovalsCommand::Approve {
                    id,
                    rationale,
                    evidence,
                    binding_hash,
                } => ApiCall::review(
                    &id,
                    "approve",
                    &rationale,
                    &evidence,
                    binding_hash.as_deref(),
                ),
                ApprovalsCommand::Deny {
                    id,
                    rationale,
                    binding_hash,
                } => ApiCall::review(&id, "deny", &rationale, &[], binding_hash.as_deref()),
                ApprovalsCommand::Cancel { id } => Ok(ApiCall::post(
                    format!("/v1/approvals/{id}/cancel"),
                    Answer::Request,
                )),
            };
            call.and_then(|c| remote.call(c))
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "mandate",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
