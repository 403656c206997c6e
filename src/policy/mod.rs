//! Cedar policy bundles: load a bundle directory whole, validate it strictly, read Mandate's
//! annotations, and prepare everything the decision path needs (per-action policy slices,
//! base entities, the policy version) so that nothing is parsed or formatted per request.
//!
//! A bundle directory holds (docs/design.md §6):
//! - `*.cedar` at the top level, read in sorted order. A policy's id is its `@id("...")`
//!   annotation, else `<file stem>.<index in file>`;
//! - `schema.cedarschema` (required, Cedar schema syntax). Policies are validated against it
//!   in strict mode. Mandate puts `context.mandate` into every request: `now` (Long, unix
//!   seconds) and, when the caller gives action properties, `action` (a record). A policy that
//!   reads them must declare them in the action's context type, e.g.
//!   `context: { amount: Long, mandate: { now: Long } }`;
//! - `entities.json` (optional): entities known to the bundle, checked against the schema;
//! - `manifest.toml` (required): `name` and `revision`, nothing else;
//! - `tests/*.yaml` (optional): test cases, see [`testing`].
//!
//! Actions are looked up by their name, the id of the action entity (`payments:transfer` for
//! `Action::"payments:transfer"`), whatever the schema namespace; a name declared in two
//! namespaces is an error.
//!
//! Every problem found is collected before failing, so one `mandate policy validate` run shows
//! them all.

pub mod annotations;
pub mod fast;
pub mod index;
pub mod shape;
pub mod testing;
pub mod values;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet, Schema,
    ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

pub use annotations::{PolicyKind, PolicyMeta, RecertifyBy};
pub use testing::TestCase;

const SCHEMA_FILE: &str = "schema.cedarschema";
const ENTITIES_FILE: &str = "entities.json";
const MANIFEST_FILE: &str = "manifest.toml";
const TESTS_DIR: &str = "tests";

/// One thing wrong with a bundle. Displayed as `file:line: policy `id`: message`, leaving out
/// the parts that are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub policy_id: Option<String>,
    pub message: String,
}

impl Problem {
    fn in_file(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: Some(file.to_owned()),
            line,
            policy_id: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(id) = &self.policy_id {
            write!(f, "policy `{id}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Everything wrong with a bundle, one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct BundleError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// The policies that can apply to one action, prepared at load.
#[derive(Debug)]
pub struct ActionSlice {
    uid: EntityUid,
    /// The `@breakglass` permits whose scope can match: only for declared emergencies.
    breakglass: PolicySet,
    /// The bundle's entities plus this action's entity and its groups (when it is in any):
    /// all a request needs besides its principal and resource. Kept per action so that copying it per
    /// request does not grow with the number of actions.
    entities: Entities,
    /// Whether any policy of the slice mentions `mandate` (`context.mandate.now`, ...): when
    /// none does, the decision path does not build that record.
    uses_mandate_context: bool,
    /// The condition of each policy in `policies`, built once here: Cedar's authorizer
    /// rebuilds (clones) every policy's condition expression on every request, which was
    /// the largest single cost of a decision.
    conditions: Vec<Condition>,
    /// Which of `conditions` a request can satisfy, from their scopes' `==` constraints.
    index: index::ScopeIndex,
    /// The context the schema declares for this action (besides `mandate`), checked against
    /// each request's ([`shape`]); `None` when it declares nothing else.
    context_shape: Option<shape::Shape>,
}

/// One policy's whole condition (scope and `when`/`unless`), ready to evaluate.
#[derive(Debug)]
pub struct Condition {
    pub id: String,
    pub expr: cedar_policy_core::ast::Expr,
    /// Slot values of a template-linked policy (empty for a static one).
    pub env: cedar_policy_core::ast::SlotEnv,
    /// The same condition compiled for the fast path, when it is in its subset
    /// ([`fast`]); Cedar evaluates `expr` wherever the fast path cannot answer.
    pub fast: Option<fast::Fast>,
}

impl Condition {
    /// `policy`'s condition, for the slice of `action`.
    fn of(policy: &Policy, action: &EntityUid) -> Self {
        let ast: &cedar_policy_core::ast::Policy = policy.as_ref();
        let expr = ast.condition();
        let env = ast.env().clone();
        Self {
            id: policy.id().to_string(),
            fast: fast::Fast::compile(&expr, &env, action.as_ref()),
            expr,
            env,
        }
    }
}

impl ActionSlice {
    pub fn uid(&self) -> &EntityUid {
        &self.uid
    }
    pub fn breakglass(&self) -> &PolicySet {
        &self.breakglass
    }
    pub fn entities(&self) -> &Entities {
        &self.entities
    }
    pub fn uses_mandate_context(&self) -> bool {
        self.uses_mandate_context
    }
    /// The condition of every non-break-glass policy whose action scope can match this
    /// action, one per policy (the policies themselves stay in the bundle's set).
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
    /// The conditions a request from `principal` on `resource` can satisfy, in slice order:
    /// the others are `false` for it by their scope alone ([`index`]).
    pub fn candidates<'a>(
        &'a self,
        principal: &cedar_policy_core::ast::EntityUID,
        resource: &cedar_policy_core::ast::EntityUID,
    ) -> impl Iterator<Item = &'a Condition> + 'a {
        self.index
            .candidates(principal, resource)
            .filter_map(|i| self.conditions.get(i))
    }
    /// The declared context, when it declares more than `mandate`.
    pub fn context_shape(&self) -> Option<&shape::Shape> {
        self.context_shape.as_ref()
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: String,
    revision: String,
}

/// A loaded, validated policy bundle. Immutable: a reload builds a new one and swaps it whole.
pub struct Bundle {
    dir: PathBuf,
    name: String,
    revision: String,
    digest: String,
    version: Arc<str>,
    schema: Schema,
    policies: PolicySet,
    entities: Entities,
    meta: HashMap<String, PolicyMeta>,
    texts: HashMap<String, String>,
    slices: HashMap<String, ActionSlice>,
    actions: Vec<String>,
    tests: Vec<TestCase>,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("policies", &self.meta.len())
            .field("actions", &self.actions.len())
            .field("tests", &self.tests.len())
            .finish_non_exhaustive()
    }
}

/// A policy as parsed from its file, before the whole set is checked.
struct Parsed {
    id: String,
    policy: Policy,
    file: PathBuf,
    line: usize,
}

/// The text of one file of the bundle, with the path it is reported and hashed under.
struct SourceFile {
    rel: String,
    path: PathBuf,
    text: String,
}

impl Bundle {
    /// Load and check the bundle in `dir`. Fails with every problem found: each stage below
    /// records what it finds wrong and the load goes on, so an author sees every problem at
    /// once.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let cedar_names = list_files(dir, |n| n.ends_with(".cedar")).map_err(|e| BundleError {
            problems: vec![Problem::in_file(
                dir,
                None,
                format!("cannot read the bundle directory: {e}"),
            )],
        })?;
        let mut load = Loader {
            dir,
            problems: Vec::new(),
            hashed: BTreeMap::new(),
        };
        let test_names = load.test_names();
        let manifest = load.manifest();
        let schema = load.schema();
        let policies = load.policies(&cedar_names);
        let annotated = load.annotations(&policies.unique);
        if let Some(schema) = &schema {
            load.validate(schema, &annotated.set, &policies);
        }
        let entities = load.entities(schema.as_ref());
        let slices = match &schema {
            Some(schema) => load.slices(schema, &entities, &policies.unique, &annotated.meta),
            None => HashMap::new(),
        };
        // Test cases: parsed (and their requests built) now, run by `mandate policy test`.
        let tests = load.tests(&test_names);

        let Loader {
            problems, hashed, ..
        } = load;
        if !problems.is_empty() {
            return Err(BundleError { problems });
        }
        let (Some(manifest), Some(schema)) = (manifest, schema) else {
            // Unreachable in practice: a missing manifest or schema is a problem above.
            return Err(BundleError {
                problems: vec![Problem::in_file(dir, None, "incomplete bundle")],
            });
        };
        let digest = digest(&hashed);
        let version: Arc<str> = Arc::from(format!("{}+{}", manifest.revision, &digest[..16]));
        let mut actions: Vec<String> = slices.keys().cloned().collect();
        actions.sort();
        Ok(Bundle {
            dir: dir.to_owned(),
            name: manifest.name,
            revision: manifest.revision,
            digest,
            version,
            schema,
            policies: annotated.set,
            entities,
            meta: annotated.meta,
            texts: annotated.texts,
            slices,
            actions,
            tests,
        })
    }

    /// The directory the bundle was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn revision(&self) -> &str {
        &self.revision
    }
    /// SHA-256 over every file of the bundle, lowercase hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }
    /// `<revision>+<first 16 hex of the digest>`: recorded with every decision.
    pub fn version(&self) -> Arc<str> {
        Arc::clone(&self.version)
    }
    pub fn policy_count(&self) -> usize {
        self.meta.len()
    }
    pub fn policy_meta(&self, id: &str) -> Option<&PolicyMeta> {
        self.meta.get(id)
    }
    /// Every policy's metadata, in no particular order.
    pub fn policies_meta(&self) -> impl Iterator<Item = &PolicyMeta> {
        self.meta.values()
    }
    /// The policy's source text, as written in its file: annotations included, byte for byte
    /// (Cedar keeps the text it parsed; the bundle id in `@id` is unchanged).
    pub fn policy_text(&self, id: &str) -> Option<&str> {
        self.texts.get(id).map(String::as_str)
    }
    /// All policies (break-glass ones included), with their bundle ids.
    pub fn policy_set(&self) -> &PolicySet {
        &self.policies
    }
    pub fn schema(&self) -> &Schema {
        &self.schema
    }
    /// `entities.json` plus the schema's action entities.
    pub fn entities(&self) -> &Entities {
        &self.entities
    }
    pub fn tests(&self) -> &[TestCase] {
        &self.tests
    }
    /// Action names declared in the schema, sorted.
    pub fn actions(&self) -> impl ExactSizeIterator<Item = &str> {
        self.actions.iter().map(String::as_str)
    }
    /// The prepared slice for an action name; `None` for an action the schema does not declare.
    pub fn slice(&self, action: &str) -> Option<&ActionSlice> {
        self.slices.get(action)
    }
}

/// Sorted names of the regular files in `dir` whose name passes `keep`.
/// A bundle being loaded: the problems found so far, and every file read (for the digest).
struct Loader<'a> {
    dir: &'a Path,
    problems: Vec<Problem>,
    hashed: BTreeMap<String, Vec<u8>>,
}

/// The bundle's policies, parsed, with unique ids.
struct ParsedPolicies {
    unique: Vec<Parsed>,
    /// Where each id was first seen (file, line), for errors about it.
    first_seen: HashMap<String, (PathBuf, usize)>,
    /// Each policy file's text, for the line of a validation error.
    sources: HashMap<PathBuf, String>,
}

/// The policies with what their annotations mean.
struct Annotated {
    set: PolicySet,
    meta: HashMap<String, PolicyMeta>,
    texts: HashMap<String, String>,
}

impl Loader<'_> {
    /// Read `rel` (recorded for the digest) as UTF-8 text.
    fn read(&mut self, rel: &str) -> Option<SourceFile> {
        let path = self.dir.join(rel);
        match std::fs::read(&path) {
            Ok(bytes) => {
                self.hashed.insert(rel.to_owned(), bytes.clone());
                match String::from_utf8(bytes) {
                    Ok(text) => Some(SourceFile {
                        rel: rel.to_owned(),
                        path,
                        text,
                    }),
                    Err(_) => {
                        self.problems
                            .push(Problem::in_file(&path, None, "not valid UTF-8"));
                        None
                    }
                }
            }
            Err(e) => {
                self.problems
                    .push(Problem::in_file(&path, None, format!("cannot read: {e}")));
                None
            }
        }
    }

    fn test_names(&mut self) -> Vec<String> {
        let tests_dir = self.dir.join(TESTS_DIR);
        if !tests_dir.is_dir() {
            return Vec::new();
        }
        match list_files(&tests_dir, |n| n.ends_with(".yaml") || n.ends_with(".yml")) {
            Ok(names) => names,
            Err(e) => {
                self.problems.push(Problem::in_file(
                    &tests_dir,
                    None,
                    format!("cannot read: {e}"),
                ));
                Vec::new()
            }
        }
    }

    fn manifest(&mut self) -> Option<Manifest> {
        if !self.dir.join(MANIFEST_FILE).is_file() {
            self.problems.push(Problem::in_file(
                &self.dir.join(MANIFEST_FILE),
                None,
                "missing (a bundle needs `name` and `revision`)",
            ));
            return None;
        }
        let src = self.read(MANIFEST_FILE)?;
        match toml::from_str::<Manifest>(&src.text) {
            Ok(m) => {
                for (key, v) in [("name", &m.name), ("revision", &m.revision)] {
                    if v.trim().is_empty() {
                        self.problems.push(Problem::in_file(
                            &src.path,
                            None,
                            format!("`{key}` must not be empty"),
                        ));
                    }
                }
                Some(m)
            }
            Err(e) => {
                let line = e.span().map(|s| line_of(&src.text, s.start));
                self.problems
                    .push(Problem::in_file(&src.path, line, e.message().trim()));
                None
            }
        }
    }

    fn schema(&mut self) -> Option<Schema> {
        if !self.dir.join(SCHEMA_FILE).is_file() {
            self.problems.push(Problem::in_file(
                &self.dir.join(SCHEMA_FILE),
                None,
                "missing",
            ));
            return None;
        }
        let src = self.read(SCHEMA_FILE)?;
        match Schema::from_cedarschema_str(&src.text) {
            Ok((schema, _warnings)) => Some(schema),
            Err(e) => {
                let line = diag_line(&src.text, &e);
                self.problems
                    .push(Problem::in_file(&src.path, line, diag_message(&e)));
                None
            }
        }
    }

    /// Policies, file by file; ids must be unique across the bundle.
    fn policies(&mut self, cedar_names: &[String]) -> ParsedPolicies {
        let mut parsed: Vec<Parsed> = Vec::new();
        let mut sources: HashMap<PathBuf, String> = HashMap::new();
        for name in cedar_names {
            let Some(src) = self.read(name) else {
                continue;
            };
            parse_file(&src, &mut parsed, &mut self.problems);
            sources.insert(PathBuf::from(&src.rel), src.text);
        }
        let mut first_seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
        let mut unique: Vec<Parsed> = Vec::with_capacity(parsed.len());
        for p in parsed {
            if let Some((file, line)) = first_seen.get(&p.id) {
                self.problems.push(Problem {
                    file: Some(self.dir.join(&p.file)),
                    line: Some(p.line),
                    policy_id: Some(p.id.clone()),
                    message: format!(
                        "duplicate policy id, also used in `{}:{line}`",
                        self.dir.join(file).display()
                    ),
                });
                continue;
            }
            first_seen.insert(p.id.clone(), (p.file.clone(), p.line));
            unique.push(p);
        }
        ParsedPolicies {
            unique,
            first_seen,
            sources,
        }
    }

    /// What each policy's annotations mean, and the policy set.
    fn annotations(&mut self, unique: &[Parsed]) -> Annotated {
        let mut meta: HashMap<String, PolicyMeta> = HashMap::with_capacity(unique.len());
        let mut texts: HashMap<String, String> = HashMap::with_capacity(unique.len());
        let mut set = PolicySet::new();
        for p in unique {
            let problem = |message: String| Problem {
                file: Some(self.dir.join(&p.file)),
                line: Some(p.line),
                policy_id: Some(p.id.clone()),
                message,
            };
            match annotations::parse(&p.id, &p.policy, p.file.clone(), p.line) {
                Ok(m) => {
                    meta.insert(p.id.clone(), m);
                }
                Err(messages) => self.problems.extend(messages.into_iter().map(problem)),
            }
            texts.insert(p.id.clone(), p.policy.to_string());
            if let Err(e) = set.add(p.policy.clone()) {
                self.problems.push(problem(e.to_string()));
            }
        }
        Annotated { set, meta, texts }
    }

    /// Strict validation against the schema.
    fn validate(&mut self, schema: &Schema, policies: &PolicySet, parsed: &ParsedPolicies) {
        let result = Validator::new(schema.clone()).validate(policies, ValidationMode::Strict);
        for e in result.validation_errors() {
            let id: &str = e.policy_id().as_ref();
            let (file, line) = match parsed.first_seen.get(id) {
                Some((file, policy_line)) => {
                    let line = parsed
                        .sources
                        .get(file)
                        .and_then(|src| diag_line(src, e))
                        .unwrap_or(*policy_line);
                    (Some(self.dir.join(file)), Some(line))
                }
                None => (None, None),
            };
            // Cedar starts its messages with the policy id, which the problem shows already.
            let message = diag_message(e);
            let message = message
                .strip_prefix(&format!("for policy `{id}`, "))
                .map(str::to_owned)
                .unwrap_or(message);
            self.problems.push(Problem {
                file,
                line,
                policy_id: Some(id.to_owned()),
                message,
            });
        }
    }

    /// Entities: the bundle's data plus the schema's action entities.
    fn entities(&mut self, schema: Option<&Schema>) -> Entities {
        let Some(schema) = schema else {
            return Entities::empty();
        };
        if self.dir.join(ENTITIES_FILE).is_file() {
            let Some(src) = self.read(ENTITIES_FILE) else {
                return Entities::empty();
            };
            match Entities::from_json_str(&src.text, Some(schema)) {
                Ok(e) => e,
                Err(e) => {
                    let line = diag_line(&src.text, &e);
                    self.problems
                        .push(Problem::in_file(&src.path, line, diag_message(&e)));
                    Entities::empty()
                }
            }
        } else {
            match schema.action_entities() {
                Ok(e) => e,
                Err(e) => {
                    self.problems.push(Problem::in_file(
                        &self.dir.join(SCHEMA_FILE),
                        None,
                        diag_message(&e),
                    ));
                    Entities::empty()
                }
            }
        }
    }

    /// Per-action slices.
    fn slices(
        &mut self,
        schema: &Schema,
        entities: &Entities,
        unique: &[Parsed],
        meta: &HashMap<String, PolicyMeta>,
    ) -> HashMap<String, ActionSlice> {
        match build_slices(schema, entities, unique, meta) {
            Ok(s) => s,
            Err(messages) => {
                for m in messages {
                    self.problems
                        .push(Problem::in_file(&self.dir.join(SCHEMA_FILE), None, m));
                }
                HashMap::new()
            }
        }
    }

    fn tests(&mut self, test_names: &[String]) -> Vec<TestCase> {
        let mut tests = Vec::new();
        for name in test_names {
            let rel = format!("{TESTS_DIR}/{name}");
            if let Some(src) = self.read(&rel) {
                match testing::parse_file(&src.path, &src.text) {
                    Ok(cases) => tests.extend(cases),
                    Err(mut p) => self.problems.append(&mut p),
                }
            }
        }
        tests
    }
}

/// The names of the regular files in `dir` that `keep` accepts, sorted. A symbolic link to a
/// regular file counts as one: a Kubernetes ConfigMap or Secret volume presents every key as a
/// link (`payments.cedar -> ..data/payments.cedar`), and skipping those would load a bundle
/// with no policies at all, which denies everything while validating fine.
fn list_files(dir: &Path, keep: impl Fn(&str) -> bool) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !keep(&name) {
            continue;
        }
        // `metadata` follows links (`DirEntry::file_type` does not). A policy file that
        // cannot be read is an error, never left out: a missing `forbid` would allow what it
        // forbids (fail closed). So is a link to nothing, or to something not a file.
        let meta = std::fs::metadata(entry.path()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("`{name}`: {e} (a link to nothing?)"))
        })?;
        if meta.is_file() {
            names.push(name);
        } else if !meta.is_dir() {
            return Err(std::io::Error::other(format!(
                "`{name}` is neither a file nor a directory"
            )));
        }
    }
    names.sort();
    Ok(names)
}

/// Parse one `.cedar` file; push its policies (re-identified) or its problems.
fn parse_file(src: &SourceFile, out: &mut Vec<Parsed>, problems: &mut Vec<Problem>) {
    let set = match PolicySet::from_str(&src.text) {
        Ok(set) => set,
        Err(errs) => {
            for e in errs.iter() {
                let line = diag_line(&src.text, e);
                problems.push(Problem::in_file(&src.path, line, diag_message(e)));
            }
            return;
        }
    };
    let stem = Path::new(&src.rel)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(&src.rel)
        .to_owned();

    // The parser names policies `policy0`, `policy1`, ... in file order; templates share
    // the numbering.
    let index = |id: &PolicyId| -> usize {
        AsRef::<str>::as_ref(id)
            .strip_prefix("policy")
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX)
    };
    for t in set.templates() {
        let text = t.to_string();
        problems.push(Problem {
            file: Some(src.path.clone()),
            line: src.text.find(&text).map(|off| line_of(&src.text, off)),
            policy_id: t.annotation("id").map(str::to_owned),
            message: "templates are not supported".to_owned(),
        });
    }
    let mut policies: Vec<&Policy> = set.policies().collect();
    policies.sort_by_key(|p| index(p.id()));
    let mut cursor = 0;
    for p in policies {
        let text = p.to_string();
        let offset = match src.text[cursor..].find(&text) {
            Some(off) => cursor + off,
            None => src.text.find(&text).unwrap_or(0),
        };
        cursor = offset + text.len();
        let id = match p.annotation("id") {
            Some(id) => id.to_owned(),
            None => format!("{stem}.{}", index(p.id())),
        };
        out.push(Parsed {
            policy: p.new_id(PolicyId::new(&id)),
            id,
            file: PathBuf::from(&src.rel),
            line: line_of(&src.text, offset),
        });
    }
}

/// For every action of the schema, the policies whose action scope can match it.
fn build_slices(
    schema: &Schema,
    entities: &Entities,
    parsed: &[Parsed],
    meta: &HashMap<String, PolicyMeta>,
) -> Result<HashMap<String, ActionSlice>, Vec<String>> {
    let actions = schema
        .action_entities()
        .map_err(|e| vec![diag_message(&e)])?;
    let action_uids: HashSet<EntityUid> = actions.iter().map(Entity::uid).collect();
    // Non-action entities: what every slice starts from.
    let data: Vec<Entity> = entities
        .iter()
        .filter(|e| !action_uids.contains(&e.uid()))
        .cloned()
        .collect();

    let mut errors = Vec::new();
    let mut slices: HashMap<String, ActionSlice> = HashMap::new();
    let mut namespaces: HashMap<String, EntityUid> = HashMap::new();
    for action in actions.iter() {
        let uid = action.uid();
        let name = uid.id().unescaped().to_owned();
        if let Some(other) = namespaces.get(&name) {
            errors.push(format!(
                "action `{name}` is declared twice (`{other}` and `{uid}`): action names must be unique across namespaces"
            ));
            continue;
        }
        namespaces.insert(name.clone(), uid.clone());
        let ancestors: HashSet<EntityUid> = actions
            .ancestors(&uid)
            .map(|a| a.cloned().collect())
            .unwrap_or_default();
        let matches = |p: &Policy| match p.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(a) => a == uid,
            ActionConstraint::In(groups) => {
                groups.iter().any(|g| *g == uid || ancestors.contains(g))
            }
        };
        let mut breakglass = PolicySet::new();
        let mut uses_mandate_context = false;
        let mut conditions = Vec::new();
        let mut regular: Vec<&Policy> = Vec::new();
        for p in parsed {
            if !matches(&p.policy) {
                continue;
            }
            let is_breakglass = meta
                .get(&p.id)
                .is_some_and(|m| m.kind == PolicyKind::Breakglass);
            // A textual test is conservative: any mention (even in a string) keeps the record.
            uses_mandate_context |= p
                .policy
                .to_string()
                .contains(crate::vocabulary::RESERVED_CONTEXT_KEY);
            if !is_breakglass {
                conditions.push(Condition::of(&p.policy, &uid));
                regular.push(&p.policy);
            } else if let Err(e) = breakglass.add(p.policy.clone()) {
                errors.push(e.to_string());
            }
        }
        // The action entity with its groups (their entities too), so `action in group` holds.
        // An action in no group is left out: Cedar reads `A in B` for an entity it does not
        // hold as `A == B`, which is then the whole truth, and the smaller store is cheaper
        // to copy per request.
        let mut own: Vec<Entity> = data.clone();
        if !ancestors.is_empty() {
            own.push(action.clone());
            for a in actions.iter().filter(|a| ancestors.contains(&a.uid())) {
                own.push(a.clone());
            }
        }
        let context_shape = shape::Shape::context(schema, &uid);
        let index = index::ScopeIndex::new(regular);
        match Entities::from_entities(own, None) {
            Ok(entities) => {
                slices.insert(
                    name,
                    ActionSlice {
                        uid,
                        breakglass,
                        entities,
                        uses_mandate_context,
                        conditions,
                        index,
                        context_shape,
                    },
                );
            }
            Err(e) => errors.push(diag_message(&e)),
        }
    }
    if errors.is_empty() {
        Ok(slices)
    } else {
        Err(errors)
    }
}

/// SHA-256 over the files in path order: path, NUL, 8-byte little-endian length, content.
fn digest(files: &BTreeMap<String, Vec<u8>>) -> String {
    let mut h = Sha256::new();
    for (path, content) in files {
        h.update(path.as_bytes());
        h.update([0u8]);
        h.update((content.len() as u64).to_le_bytes());
        h.update(content);
    }
    hex::encode(h.finalize())
}

/// 1-based line of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The line of a diagnostic's first labelled span in `src`.
fn diag_line(src: &str, d: &dyn miette::Diagnostic) -> Option<usize> {
    let label = d.labels()?.next()?;
    Some(line_of(src, label.offset()))
}

/// A diagnostic's message, followed by its causes and its help when it has them.
fn diag_message(d: &dyn miette::Diagnostic) -> String {
    let mut message = d.to_string();
    let mut source = d.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    if let Some(help) = d.help() {
        message.push_str(&format!(" ({help})"));
    }
    message
}

#[cfg(test)]
mod tests;
