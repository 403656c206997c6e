//! Mandate: a runtime authorization sidecar for AI agents and workloads.
//!
//! Comments cite the design card and the attack and fault catalogue in `docs/`: `DESIGN §5`
//! is section 5 of `docs/design.md`, `SECURITY A-16` is case A-16 of `docs/security.md`.
//!
//! # Layout
//!
//! Dependencies point inward and downward; there is no import cycle among these modules.
//! Adapters (`api`, `cli`) parse wire input into core types, call [`service`], and render
//! its result; the core knows nothing of hyper, SQL or JSON bodies.
//!
//! - [`vocabulary`]: the leaf every module speaks: [`vocabulary::Principal`],
//!   [`vocabulary::CheckRequest`], [`vocabulary::Decision`] with its outcome, reasons and
//!   approval requirement, and the reserved context key. Imports no other module.
//! - [`metrics`]: the instruments every module records into (decisions, latency, tokens,
//!   caches, approval events, audit syncs), on the OpenTelemetry metrics API; a leaf.
//! - [`clock`]: injectable time; every expiry reads it, so tests move it instead of sleeping.
//! - [`config`]: the TOML file plus `MANDATE_SECTION__KEY` overrides, parsed whole; every bad
//!   value is reported with its key path before start-up fails.
//! - [`strict_json`]: JSON for untrusted bytes (tokens, key sets, request bodies): duplicate
//!   keys refused at every depth, with the path to the duplicate; nesting bounded.
//! - [`identity`]: workload identity. Strict JWS parsing before any cryptography, trusted
//!   issuers with their JWKS (file or URL, refreshed in the background), SPIFFE / Kubernetes /
//!   OIDC profiles, and the verified-token cache that makes microsecond checks possible.
//! - [`policy`]: the Cedar policy bundle: load and validate, annotations (`@approval`, ...),
//!   per-action slices, the policy version, JSON to Cedar values, and the bundle's test cases.
//! - [`decision`]: the engine that turns a check into exactly one of allow, deny or escalate,
//!   failing closed, in named stages (context, entities, evaluation, tally); the per-second
//!   decision cache; and the runner of a bundle's test cases.
//! - [`audit`]: the hash-chained JSON-lines log of every decision, and its offline verifier.
//! - [`approval`]: human approval, the core: requests, reviews, request-bound grants, the
//!   binding hash, the grant cache, and the `ApprovalStore` trait (no SQL).
//! - [`store`]: the `ApprovalStore` backends, SQLite and PostgreSQL: the only module with SQL.
//! - [`lockfile`]: one writer per data file (the audit log, a SQLite store): an exclusive
//!   lock held for the process lifetime, refused at start with the holder's pid.
//! - [`notify`]: outbound webhooks about approval requests, retried, never in the way.
//! - [`routes`]: request → action routes: how an HTTP request a proxy asks about (method,
//!   host, path template, headers, query, JSON body) becomes a check; pure, no HTTP types.
//! - [`service`]: the workflows every adapter calls: check (decide, settle against grants and
//!   the store, audit), review, cancel, revoke, the approvals queries, the sweep. Every
//!   fail-closed choice of a workflow is made there.
//! - [`api`]: the HTTP adapter: the native `/v1/check` API, AuthZEN 1.0, the approvals API
//!   and admin endpoints. Statuses are chosen in one `match` per service error enum.
//! - [`app`]: wiring: builds the service from the configuration and runs the listeners until
//!   shutdown, with the clock it is given.
//! - [`cli`]: the subcommands (`check`, `policy validate|test`, `dev token`, `audit verify`,
//!   and the approvals client).
//! - [`telemetry`]: logging set-up, and the OpenTelemetry SDK behind [`metrics`]: the
//!   Prometheus text of `/metrics`, OTLP export, and the values observed at collection time.
//! - `fuzzing` (hidden): thin entry points for the fuzz targets of `fuzz/` and `tests/fuzz.rs`
//!   into the private parsers (tokens, key sets, request bodies, bundles).

pub mod api;
pub mod app;
pub mod approval;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decision;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod lockfile;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod routes;
pub mod service;
pub mod store;
pub mod strict_json;
pub mod telemetry;
pub mod vocabulary;
