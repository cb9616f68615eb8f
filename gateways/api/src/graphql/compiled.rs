//! Compiled reads: the common read queries (an installation by id, a page of installations,
//! with their connections and pages of operations) answered without the GraphQL executor.
//! A query text the executor once answered without an error is compiled (once) into a plan;
//! later requests with it bind their variables to the plan, fetch every document in one
//! statement and one round trip (`amplog_projections::reads`, after the request's tenancy
//! settings) and write the response's JSON directly: the values the executor writes (the
//! same conversions from the documents, the same scalar formats), with an object's keys in
//! the order of the selection (the executor writes them as its resolvers finish).
//!
//! Anything else — another field, a directive, a variable of another type, a value the
//! executor would refuse, a complexity over the limit, a document not found — goes to the
//! executor, which answers (or refuses) it as always. A plan only ever answers what the
//! executor answered the same way.

use super::query::{page_complexity, DEFAULT_PAGE, MAX_PAGE};
use super::types::{Connection, Installation, Operation};
use amplog_projections::docs::{ConnectionDoc, InstallationDoc, OperationDoc};
use amplog_projections::reads::{self, Fetched, InstallationRead, Installations, OperationsPage};
use async_graphql::parser::types::{
    BaseType, DocumentOperations, ExecutableDocument, FragmentDefinition, OperationType, Selection, SelectionSet, Type,
};
use async_graphql::{Name, Positioned, Variables};
use async_graphql_value::{ConstValue, Value};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// Plans by query text and operation name; `None`: not compilable (the executor answers).
pub type PlanCache = moka::sync::Cache<(String, Option<String>), Arc<Option<Plan>>>;

pub fn plan_cache(bytes: u64) -> PlanCache {
    moka::sync::Cache::builder()
        .weigher(|key: &(String, Option<String>), _: &Arc<Option<Plan>>| {
            u32::try_from(key.0.len() * 8 + 512).unwrap_or(u32::MAX)
        })
        .max_capacity(bytes)
        .build()
}

/// A compiled query.
#[derive(Debug)]
pub struct Plan {
    variables: Vec<VariableDef>,
    roots: Vec<Root>,
    /// The document's fields as the complexity limit counts them (every occurrence).
    complexity: Vec<Cost>,
    /// The span's name (`query {fields}`) and its root fields, as `graphql::describe` gives.
    span_name: String,
    fields: String,
}

#[derive(Debug)]
struct VariableDef {
    name: Name,
    base: Scalar,
    nullable: bool,
    default: Option<ConstValue>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scalar {
    Uuid,
    Int,
    String,
    Boolean,
}

/// An argument: absent, written in the query, or a variable's.
#[derive(Clone, Debug)]
enum Arg {
    Absent,
    Value(Value),
}

#[derive(Debug)]
struct Root {
    key: String,
    kind: RootKind,
}

#[derive(Debug)]
enum RootKind {
    Typename,
    Installation { id: Arg, fields: Vec<Field> },
    Installations { first: Arg, after: Arg, filter: Arg, fields: Vec<Field> },
}

/// A selected field: its response key, its name, its arguments, what it selects.
#[derive(Debug)]
struct Field {
    key: String,
    name: &'static str,
    args: Vec<(&'static str, Arg)>,
    fields: Vec<Field>,
}

impl Field {
    fn arg(&self, name: &str) -> &Arg {
        self.args.iter().find(|(n, _)| *n == name).map(|(_, a)| a).unwrap_or(&Arg::Absent)
    }
}

/// One field occurrence as async-graphql's complexity visitor counts it.
#[derive(Debug)]
struct Cost {
    /// A page's `first` and `last` (its cost is `page_complexity`), or a plain field (1 + children).
    page: Option<(Arg, Arg)>,
    children: Vec<Cost>,
}

/// The fields each type answers here: name, whether it selects an object (by type name).
type TypeFields = &'static [(&'static str, Option<&'static str>)];

fn fields_of(type_name: &str) -> Option<TypeFields> {
    Some(match type_name {
        "Installation" => &[
            ("id", None),
            ("integrationId", None),
            ("revision", None),
            ("groupRef", None),
            ("consumerRef", None),
            ("connectionId", None),
            ("connectionStatus", None),
            ("health", None),
            ("paused", None),
            ("deleted", None),
            ("objects", Some("InstallationObject")),
            ("lastOperation", Some("LastOperationSummary")),
            ("createdAt", None),
            ("updatedAt", None),
            ("connection", Some("Connection")),
            ("operations", Some("OperationPage")),
        ],
        "InstallationObject" => &[
            ("name", None),
            ("enabled", None),
            ("schedule", None),
            ("backfill", None),
            ("backfillDays", None),
            ("lastSuccessfulRead", None),
        ],
        "LastOperationSummary" => {
            &[("operationId", None), ("opType", None), ("object", None), ("status", None), ("at", None)]
        }
        "Connection" => &[
            ("id", None),
            ("integrationId", None),
            ("provider", None),
            ("groupRef", None),
            ("status", None),
            ("credentialFingerprint", None),
            ("lastRefreshAt", None),
            ("failureReason", None),
            ("createdAt", None),
            ("updatedAt", None),
        ],
        "OperationPage" => &[("nodes", Some("Operation")), ("pageInfo", Some("PageInfo"))],
        "InstallationConnection" => {
            &[("pageInfo", Some("PageInfo")), ("edges", Some("InstallationEdge")), ("nodes", Some("Installation"))]
        }
        "InstallationEdge" => &[("node", Some("Installation")), ("cursor", None)],
        "PageInfo" => &[("hasPreviousPage", None), ("hasNextPage", None), ("startCursor", None), ("endCursor", None)],
        "Operation" => &[
            ("id", None),
            ("installationId", None),
            ("opType", None),
            ("object", None),
            ("trigger", None),
            ("since", None),
            ("until", None),
            ("status", None),
            ("attempts", None),
            ("pages", None),
            ("records", None),
            ("bytes", None),
            ("errorClass", None),
            ("errorMessage", None),
            ("requestedAt", None),
            ("startedAt", None),
            ("finishedAt", None),
            ("durationMs", None),
            ("deliveryAttempts", None),
            ("deliveryFailures", None),
            ("deadLettered", None),
            ("httpStatus", None),
            ("version", None),
        ],
        _ => return None,
    })
}

/// The arguments a field takes here (any other makes the query not compilable).
fn args_of(type_name: &str, field: &str) -> &'static [&'static str] {
    match (type_name, field) {
        ("Installation", "operations") => &["first", "after", "status", "opType"],
        _ => &[],
    }
}

struct Compiler<'d> {
    fragments: &'d HashMap<Name, Positioned<FragmentDefinition>>,
    /// Fragment spreads being inlined (a cycle is a validation error; refused here too).
    inlining: Vec<Name>,
    /// Fields inlined so far: fragments spread twice at each of many levels multiply, so a
    /// compile stops (the executor answers) past `MAX_FIELDS`.
    fields: usize,
}

/// The most field occurrences a compiled query may inline.
const MAX_FIELDS: usize = 1_000;

/// Compiles `operation` of `doc`, if it is a query this module answers.
pub fn compile(doc: &ExecutableDocument, operation: Option<&str>) -> Option<Plan> {
    let op = match (&doc.operations, operation) {
        (DocumentOperations::Single(op), _) => op,
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name)?,
        // A named operation alone in its document runs without its name being sent.
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => ops.values().next()?,
        (DocumentOperations::Multiple(_), None) => return None,
    };
    let op = &op.node;
    if op.ty != OperationType::Query || !op.directives.is_empty() {
        return None;
    }
    let mut variables = Vec::new();
    for def in &op.variable_definitions {
        let def = &def.node;
        if !def.directives.is_empty() {
            return None;
        }
        let (base, nullable) = scalar_type(&def.var_type.node)?;
        variables.push(VariableDef {
            name: def.name.node.clone(),
            base,
            nullable,
            default: def.default_value.as_ref().map(|d| d.node.clone()),
        });
    }
    let mut compiler = Compiler { fragments: &doc.fragments, inlining: Vec::new(), fields: 0 };
    let mut roots: Vec<Root> = Vec::new();
    let mut complexity = Vec::new();
    for (key, name, field) in compiler.flatten(&op.selection_set, "Query")? {
        let args = |allowed: &[&'static str]| -> Option<Vec<(&'static str, Arg)>> {
            let mut out = Vec::new();
            for (arg_name, value) in &field.arguments {
                let known = allowed.iter().find(|a| **a == arg_name.node.as_str())?;
                out.push((*known, Arg::Value(value.node.clone())));
            }
            Some(out)
        };
        let get = |args: &[(&'static str, Arg)], name: &str| {
            args.iter().find(|(n, _)| *n == name).map(|(_, a)| a.clone()).unwrap_or(Arg::Absent)
        };
        let kind = match name.as_str() {
            "__typename" => {
                complexity.push(Cost { page: None, children: Vec::new() });
                RootKind::Typename
            }
            "installation" => {
                let a = args(&["id"])?;
                let (fields, costs) = compiler.fields(&field.selection_set, "Installation")?;
                complexity.push(Cost { page: None, children: costs });
                RootKind::Installation { id: get(&a, "id"), fields }
            }
            "installations" => {
                let a = args(&["first", "after", "filter"])?;
                let (fields, costs) = compiler.fields(&field.selection_set, "InstallationConnection")?;
                complexity.push(Cost { page: Some((get(&a, "first"), Arg::Absent)), children: costs });
                RootKind::Installations {
                    first: get(&a, "first"),
                    after: get(&a, "after"),
                    filter: get(&a, "filter"),
                    fields,
                }
            }
            _ => return None,
        };
        // Two roots under one response key are merged by the executor; not here.
        if roots.iter().any(|r| r.key == key) {
            return None;
        }
        roots.push(Root { key, kind });
    }
    let fields: Vec<&str> = op
        .selection_set
        .node
        .items
        .iter()
        .filter_map(|item| match &item.node {
            Selection::Field(field) => Some(super::span_name(field.node.name.node.as_str())),
            _ => None,
        })
        .take(8)
        .collect();
    let fields = fields.join(",");
    Some(Plan { variables, roots, complexity, span_name: format!("query {fields}"), fields })
}

fn scalar_type(ty: &Type) -> Option<(Scalar, bool)> {
    let BaseType::Named(name) = &ty.base else { return None };
    let base = match name.as_str() {
        "UUID" => Scalar::Uuid,
        "Int" => Scalar::Int,
        "String" => Scalar::String,
        "Boolean" => Scalar::Boolean,
        _ => return None,
    };
    Some((base, ty.nullable))
}

impl<'d> Compiler<'d> {
    /// The fields of a selection set on `type_name`, fragments inlined, in document order:
    /// (response key, field name, field).
    fn flatten(
        &mut self,
        set: &'d Positioned<SelectionSet>,
        type_name: &str,
    ) -> Option<Vec<(String, Name, &'d async_graphql::parser::types::Field)>> {
        let mut out = Vec::new();
        for selection in &set.node.items {
            match &selection.node {
                Selection::Field(field) => {
                    let f = &field.node;
                    if !f.directives.is_empty() {
                        return None;
                    }
                    let key = f.alias.as_ref().unwrap_or(&f.name).node.to_string();
                    self.fields += 1;
                    if self.fields > MAX_FIELDS {
                        return None;
                    }
                    out.push((key, f.name.node.clone(), f));
                }
                Selection::InlineFragment(fragment) => {
                    let fragment = &fragment.node;
                    if !fragment.directives.is_empty() {
                        return None;
                    }
                    if let Some(on) = &fragment.type_condition {
                        if on.node.on.node.as_str() != type_name {
                            return None;
                        }
                    }
                    out.extend(self.flatten(&fragment.selection_set, type_name)?);
                }
                Selection::FragmentSpread(spread) => {
                    let spread = &spread.node;
                    let name = &spread.fragment_name.node;
                    if !spread.directives.is_empty() || self.inlining.contains(name) {
                        return None;
                    }
                    let fragment = &self.fragments.get(name)?.node;
                    if !fragment.directives.is_empty() || fragment.type_condition.node.on.node.as_str() != type_name {
                        return None;
                    }
                    self.inlining.push(name.clone());
                    let inner = self.flatten(&fragment.selection_set, type_name);
                    self.inlining.pop();
                    out.extend(inner?);
                }
            }
        }
        Some(out)
    }

    /// The plan of a selection set on `type_name` (fields under one response key merged, as
    /// the executor merges them) and its complexity.
    fn fields(&mut self, set: &'d Positioned<SelectionSet>, type_name: &str) -> Option<(Vec<Field>, Vec<Cost>)> {
        let known = fields_of(type_name)?;
        let mut fields: Vec<Field> = Vec::new();
        let mut costs = Vec::new();
        for (key, name, field) in self.flatten(set, type_name)? {
            if name.as_str() == "__typename" {
                costs.push(Cost { page: None, children: Vec::new() });
                if fields.iter().all(|f| f.key != key) {
                    fields.push(Field { key, name: "__typename", args: Vec::new(), fields: Vec::new() });
                }
                continue;
            }
            let (name, child) = known.iter().find(|(n, _)| *n == name.as_str())?;
            let allowed = args_of(type_name, name);
            let mut args = Vec::new();
            for (arg, value) in &field.arguments {
                let arg = allowed.iter().find(|a| **a == arg.node.as_str())?;
                args.push((*arg, Arg::Value(value.node.clone())));
            }
            let (children, child_costs) = match child {
                Some(child) => self.fields(&field.selection_set, child)?,
                None => (Vec::new(), Vec::new()),
            };
            let page = (type_name == "Installation" && *name == "operations").then(|| {
                let first = args.iter().find(|(a, _)| *a == "first").map(|(_, v)| v.clone()).unwrap_or(Arg::Absent);
                (first, Arg::Absent)
            });
            costs.push(Cost { page, children: child_costs });
            match fields.iter_mut().find(|f| f.key == key) {
                // The same field again under its key: validation made the arguments equal.
                Some(existing) if existing.name == *name => merge(&mut existing.fields, children),
                Some(_) => return None,
                None => fields.push(Field { key, name, args, fields: children }),
            }
        }
        Some((fields, costs))
    }
}

fn merge(into: &mut Vec<Field>, more: Vec<Field>) {
    for field in more {
        match into.iter_mut().find(|f| f.key == field.key) {
            Some(existing) => merge(&mut existing.fields, field.fields),
            None => into.push(field),
        }
    }
}

/// A plan bound to one request's variables: what to fetch, and how to write the answer.
pub struct Bound<'p> {
    plan: &'p Plan,
    values: HashMap<&'p str, ConstValue>,
    pub reads: Vec<InstallationRead>,
    /// Per root: the page size asked for (an installations page).
    limits: Vec<usize>,
    /// Per `operations` field (by address in the plan): its page among the root's reads,
    /// and its page size.
    pages: HashMap<usize, (usize, usize)>,
}

impl Plan {
    pub fn span_name(&self) -> &str {
        &self.span_name
    }

    pub fn fields(&self) -> &str {
        &self.fields
    }

    /// Binds the request's variables; `None` when any would not pass the executor unchanged
    /// (a missing or mistyped value, a page size it refuses) or the complexity is over
    /// `max_complexity`.
    pub fn bind(&self, variables: &Variables, max_complexity: usize) -> Option<Bound<'_>> {
        let mut values = HashMap::new();
        for def in &self.variables {
            let value = match variables.get(&def.name) {
                Some(v) => v.clone(),
                None => def.default.clone().unwrap_or(ConstValue::Null),
            };
            let fits = match (&value, def.base) {
                (ConstValue::Null, _) => def.nullable,
                (ConstValue::String(s), Scalar::Uuid) => Uuid::parse_str(s).is_ok(),
                (ConstValue::String(_), Scalar::String) => true,
                (ConstValue::Number(n), Scalar::Int) => n.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
                (ConstValue::Boolean(_), Scalar::Boolean) => true,
                _ => false,
            };
            if !fits {
                return None;
            }
            values.insert(def.name.as_str(), value);
        }
        let mut bound = Bound { plan: self, values, reads: Vec::new(), limits: Vec::new(), pages: HashMap::new() };
        let complexity: usize = self.complexity.iter().map(|c| bound.cost(c)).sum::<Option<usize>>()?;
        if complexity > max_complexity {
            return None;
        }
        for root in &self.roots {
            let (installations, fields, limit) = match &root.kind {
                RootKind::Typename => {
                    bound.limits.push(0);
                    continue;
                }
                RootKind::Installation { id, fields } => (Installations::ById(bound.uuid(id)??), fields, 1),
                RootKind::Installations { first, after, filter, fields } => {
                    // async-graphql's `query` refuses a negative `first`; a larger one is cut.
                    let first = match bound.int(first)? {
                        Some(n) if n < 0 => return None,
                        Some(n) => (n as usize).min(MAX_PAGE),
                        None => DEFAULT_PAGE.min(MAX_PAGE),
                    };
                    let filter = bound.filter(filter)?;
                    let page = Installations::Page {
                        after: match bound.string(after)? {
                            Some(after) => Some(Uuid::try_parse(&after).ok()?),
                            None => None,
                        },
                        integration_id: filter.integration_id,
                        group_ref: filter.group_ref,
                        health: filter.health,
                        paused: filter.paused,
                        include_deleted: filter.include_deleted,
                        limit: first as i64 + 1,
                    };
                    (page, fields, first)
                }
            };
            let nodes = match &root.kind {
                RootKind::Installations { .. } => installation_fields(fields),
                _ => fields.iter().collect(),
            };
            let connection = nodes.iter().any(|f| f.name == "connection");
            let mut operations = Vec::new();
            for field in nodes.iter().filter(|f| f.name == "operations") {
                let first = match bound.int(field.arg("first"))? {
                    None => DEFAULT_PAGE as i64,
                    Some(n) if (0..=MAX_PAGE as i64).contains(&n) => n,
                    Some(_) => return None,
                };
                let after = match bound.string(field.arg("after"))? {
                    Some(after) => Some(Uuid::try_parse(&after).ok()?),
                    None => None,
                };
                let page = OperationsPage {
                    after,
                    status: bound.string(field.arg("status"))?,
                    op_type: bound.string(field.arg("opType"))?,
                    limit: first + 1,
                };
                let index = match operations.iter().position(|p| *p == page) {
                    Some(index) => index,
                    None => {
                        operations.push(page);
                        operations.len() - 1
                    }
                };
                bound.pages.insert(*field as *const Field as usize, (index, first as usize));
            }
            bound.reads.push(InstallationRead { installations, connection, operations });
            bound.limits.push(limit);
        }
        Some(bound)
    }
}

/// The installation fields selected under an `InstallationConnection` (through `nodes` and
/// `edges { node }`).
fn installation_fields(fields: &[Field]) -> Vec<&Field> {
    let mut out = Vec::new();
    for field in fields {
        match field.name {
            "nodes" => out.extend(field.fields.iter()),
            "edges" => {
                for edge in field.fields.iter().filter(|f| f.name == "node") {
                    out.extend(edge.fields.iter());
                }
            }
            _ => {}
        }
    }
    out
}

#[derive(Default)]
struct Filter {
    integration_id: Option<Uuid>,
    group_ref: Option<String>,
    health: Option<String>,
    paused: Option<bool>,
    include_deleted: bool,
}

impl Bound<'_> {
    /// An argument's value (`Null` when absent); `None` when it names an unknown variable.
    fn value(&self, arg: &Arg) -> Option<ConstValue> {
        match arg {
            Arg::Absent => Some(ConstValue::Null),
            Arg::Value(v) => v.clone().into_const_with(|name| self.values.get(name.as_str()).cloned().ok_or(())).ok(),
        }
    }

    fn int(&self, arg: &Arg) -> Option<Option<i64>> {
        match self.value(arg)? {
            ConstValue::Null => Some(None),
            ConstValue::Number(n) => Some(Some(i64::from(i32::try_from(n.as_i64()?).ok()?))),
            _ => None,
        }
    }

    fn string(&self, arg: &Arg) -> Option<Option<String>> {
        match self.value(arg)? {
            ConstValue::Null => Some(None),
            ConstValue::String(s) => Some(Some(s)),
            _ => None,
        }
    }

    fn uuid(&self, arg: &Arg) -> Option<Option<Uuid>> {
        Some(match self.string(arg)? {
            Some(s) => Some(Uuid::parse_str(&s).ok()?),
            None => None,
        })
    }

    fn filter(&self, arg: &Arg) -> Option<Filter> {
        let mut filter = Filter::default();
        let fields = match self.value(arg)? {
            ConstValue::Null => return Some(filter),
            ConstValue::Object(fields) => fields,
            _ => return None,
        };
        for (name, value) in fields {
            use ConstValue as V;
            match (name.as_str(), value) {
                (_, V::Null) if name.as_str() != "includeDeleted" => {}
                ("integrationId", V::String(s)) => filter.integration_id = Some(Uuid::parse_str(&s).ok()?),
                ("groupRef", V::String(s)) => filter.group_ref = Some(s),
                ("health", V::Enum(e)) => {
                    filter.health = Some(
                        match e.as_str() {
                            "HEALTHY" => "healthy",
                            "DEGRADED" => "degraded",
                            "NEEDS_REAUTH" => "needs_reauth",
                            _ => return None,
                        }
                        .to_string(),
                    );
                }
                ("paused", V::Boolean(b)) => filter.paused = Some(b),
                ("includeDeleted", V::Boolean(b)) => filter.include_deleted = b,
                _ => return None,
            }
        }
        Some(filter)
    }

    /// A field occurrence's complexity, as async-graphql computes it.
    fn cost(&self, cost: &Cost) -> Option<usize> {
        let children: usize = cost.children.iter().map(|c| self.cost(c)).sum::<Option<usize>>()?;
        Some(match &cost.page {
            None => 1 + children,
            Some((first, last)) => {
                let n = |a: &Arg| -> Option<Option<i32>> { Some(self.int(a)?.map(|n| n as i32)) };
                page_complexity(n(first)?, n(last)?, children)
            }
        })
    }

    /// The response (`{"data":{…}}`) from the fetched documents; `None` when a document the
    /// executor would report as missing (or any it could not decode) is not there.
    pub fn answer(&self, fetched: Vec<Fetched>) -> Option<Vec<u8>> {
        let numbered = reads::nodes(&self.reads);
        let mut by_node: Vec<Vec<Fetched>> = Vec::new();
        for row in fetched {
            if by_node.len() <= row.node {
                by_node.resize_with(row.node + 1, Vec::new);
            }
            by_node[row.node].push(row);
        }
        let mut take = |node: usize| by_node.get_mut(node).map(std::mem::take).unwrap_or_default();
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(b"{\"data\":{");
        let mut numbered = numbered.iter();
        for (i, root) in self.plan.roots.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            key(&mut out, &root.key);
            if let RootKind::Typename = root.kind {
                string(&mut out, "Query");
                continue;
            }
            let nodes = numbered.next()?;
            let mut installations = take(nodes.installations);
            installations.sort_by(|a, b| a.key.cmp(&b.key));
            let connections: HashMap<Uuid, Connection> = match nodes.connection {
                Some(node) => take(node)
                    .into_iter()
                    .map(|row| {
                        let doc: ConnectionDoc = serde_json::from_str(&row.doc).ok()?;
                        Some((doc.connection_id, Connection::from(doc)))
                    })
                    .collect::<Option<_>>()?,
                None => HashMap::new(),
            };
            let mut pages: Vec<HashMap<String, Vec<Operation>>> = Vec::new();
            for &node in &nodes.operations {
                let mut rows = take(node);
                rows.sort_by(|a, b| b.key.cmp(&a.key));
                let mut page: HashMap<String, Vec<Operation>> = HashMap::new();
                for row in rows {
                    let doc: OperationDoc = serde_json::from_str(&row.doc).ok()?;
                    page.entry(row.parent?).or_default().push(Operation::from(doc));
                }
                pages.push(page);
            }
            let nested = Nested { connections: &connections, pages: &pages, bound: self };
            match &root.kind {
                RootKind::Typename => unreachable!("answered above"),
                RootKind::Installation { fields, .. } => {
                    let row = installations.pop()?;
                    let doc: InstallationDoc = serde_json::from_str(&row.doc).ok()?;
                    nested.installation(&mut out, &Installation::from(doc), fields);
                }
                RootKind::Installations { fields, after, .. } => {
                    let limit = self.limits[i];
                    let more = installations.len() > limit;
                    installations.truncate(limit);
                    let nodes: Vec<(String, Installation)> = installations
                        .into_iter()
                        .map(|row| {
                            Some((row.key, Installation::from(serde_json::from_str::<InstallationDoc>(&row.doc).ok()?)))
                        })
                        .collect::<Option<_>>()?;
                    let has_previous = !matches!(self.value(after)?, ConstValue::Null);
                    nested.connection_page(&mut out, &nodes, has_previous, more, fields);
                }
            }
        }
        out.extend_from_slice(b"}}");
        Some(out)
    }
}

/// What an installation's nested fields are answered from.
struct Nested<'a> {
    connections: &'a HashMap<Uuid, Connection>,
    pages: &'a [HashMap<String, Vec<Operation>>],
    bound: &'a Bound<'a>,
}

impl Nested<'_> {
    fn connection_page(
        &self,
        out: &mut Vec<u8>,
        nodes: &[(String, Installation)],
        has_previous: bool,
        has_next: bool,
        fields: &[Field],
    ) {
        object(out, fields, |out, field| match field.name {
            "__typename" => string(out, "InstallationConnection"),
            "pageInfo" => page_info(
                out,
                &field.fields,
                has_previous,
                has_next,
                nodes.first().map(|(k, _)| k.as_str()),
                nodes.last().map(|(k, _)| k.as_str()),
            ),
            "nodes" => list(out, nodes, |out, (_, node)| self.installation(out, node, &field.fields)),
            "edges" => list(out, nodes, |out, (cursor, node)| {
                object(out, &field.fields, |out, edge| match edge.name {
                    "__typename" => string(out, "InstallationEdge"),
                    "cursor" => string(out, cursor),
                    _ => self.installation(out, node, &edge.fields),
                });
            }),
            _ => out.extend_from_slice(b"null"),
        });
    }

    fn installation(&self, out: &mut Vec<u8>, i: &Installation, fields: &[Field]) {
        object(out, fields, |out, field| match field.name {
            "__typename" => string(out, "Installation"),
            "id" => uuid(out, i.id),
            "integrationId" => uuid(out, i.integration_id),
            "revision" => number(out, i.revision),
            "groupRef" => string(out, &i.group_ref),
            "consumerRef" => string(out, &i.consumer_ref),
            "connectionId" => uuid(out, i.connection_id),
            "connectionStatus" => string(out, &i.connection_status),
            "health" => string(out, &i.health),
            "paused" => boolean(out, i.paused),
            "deleted" => boolean(out, i.deleted),
            "createdAt" => time(out, i.created_at),
            "updatedAt" => time(out, i.updated_at),
            "objects" => list(out, &i.objects, |out, o| {
                object(out, &field.fields, |out, f| match f.name {
                    "__typename" => string(out, "InstallationObject"),
                    "name" => string(out, &o.name),
                    "enabled" => boolean(out, o.enabled),
                    "schedule" => string(out, &o.schedule),
                    "backfill" => string(out, &o.backfill),
                    "backfillDays" => optional(out, o.backfill_days, number),
                    _ => time(out, o.last_successful_read),
                });
            }),
            "lastOperation" => match &i.last_operation {
                None => out.extend_from_slice(b"null"),
                Some(l) => object(out, &field.fields, |out, f| match f.name {
                    "__typename" => string(out, "LastOperationSummary"),
                    "operationId" => uuid(out, l.operation_id),
                    "opType" => string(out, &l.op_type),
                    "object" => string(out, &l.object),
                    "status" => string(out, &l.status),
                    _ => time(out, Some(l.at)),
                }),
            },
            "connection" => match self.connections.get(&i.connection_id) {
                None => out.extend_from_slice(b"null"),
                Some(c) => connection(out, c, &field.fields),
            },
            "operations" => {
                let page = self.operations_page(field);
                let all = page.map(|(p, first)| (p.get(&i.id.to_string()).map(Vec::as_slice), first));
                let (ops, first) = match all {
                    Some((ops, first)) => (ops.unwrap_or_default(), first),
                    None => (&[][..], 0),
                };
                let more = ops.len() > first;
                let ops = &ops[..ops.len().min(first)];
                object(out, &field.fields, |out, f| match f.name {
                    "__typename" => string(out, "OperationPage"),
                    "nodes" => list(out, ops, |out, op| operation(out, op, &f.fields)),
                    _ => page_info(
                        out,
                        &f.fields,
                        false,
                        more,
                        ops.first().map(|o| o.id.to_string()).as_deref(),
                        ops.last().map(|o| o.id.to_string()).as_deref(),
                    ),
                });
            }
            _ => out.extend_from_slice(b"null"),
        });
    }

    /// The fetched page an `operations` field reads, and its page size (recorded at bind).
    fn operations_page(&self, field: &Field) -> Option<(&HashMap<String, Vec<Operation>>, usize)> {
        let (index, first) = *self.bound.pages.get(&(field as *const Field as usize))?;
        Some((self.pages.get(index)?, first))
    }
}

fn connection(out: &mut Vec<u8>, c: &Connection, fields: &[Field]) {
    object(out, fields, |out, f| match f.name {
        "__typename" => string(out, "Connection"),
        "id" => uuid(out, c.id),
        "integrationId" => uuid(out, c.integration_id),
        "provider" => string(out, &c.provider),
        "groupRef" => string(out, &c.group_ref),
        "status" => string(out, &c.status),
        "credentialFingerprint" => string(out, &c.credential_fingerprint),
        "lastRefreshAt" => time(out, c.last_refresh_at),
        "failureReason" => optional(out, c.failure_reason.as_deref(), string),
        "createdAt" => time(out, c.created_at),
        _ => time(out, c.updated_at),
    });
}

fn operation(out: &mut Vec<u8>, o: &Operation, fields: &[Field]) {
    object(out, fields, |out, f| match f.name {
        "__typename" => string(out, "Operation"),
        "id" => uuid(out, o.id),
        "installationId" => uuid(out, o.installation_id),
        "opType" => string(out, &o.op_type),
        "object" => string(out, &o.object),
        "trigger" => string(out, &o.trigger),
        "since" => time(out, o.since),
        "until" => time(out, o.until),
        "status" => string(out, &o.status),
        "attempts" => number(out, o.attempts),
        "pages" => number(out, o.pages.0),
        "records" => number(out, o.records.0),
        "bytes" => number(out, o.bytes.0),
        "errorClass" => optional(out, o.error_class.as_deref(), string),
        "errorMessage" => optional(out, o.error_message.as_deref(), string),
        "requestedAt" => time(out, o.requested_at),
        "startedAt" => time(out, o.started_at),
        "finishedAt" => time(out, o.finished_at),
        "durationMs" => optional(out, o.duration_ms.map(|d| d.0), number),
        "deliveryAttempts" => number(out, o.delivery_attempts.0),
        "deliveryFailures" => number(out, o.delivery_failures.0),
        "deadLettered" => boolean(out, o.dead_lettered),
        "httpStatus" => optional(out, o.http_status, number),
        _ => number(out, o.version.0),
    });
}

fn page_info(
    out: &mut Vec<u8>,
    fields: &[Field],
    has_previous: bool,
    has_next: bool,
    start: Option<&str>,
    end: Option<&str>,
) {
    object(out, fields, |out, f| match f.name {
        "__typename" => string(out, "PageInfo"),
        "hasPreviousPage" => boolean(out, has_previous),
        "hasNextPage" => boolean(out, has_next),
        "startCursor" => optional(out, start, string),
        _ => optional(out, end, string),
    });
}

fn object(out: &mut Vec<u8>, fields: &[Field], mut value: impl FnMut(&mut Vec<u8>, &Field)) {
    out.push(b'{');
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        key(out, &field.key);
        value(out, field);
    }
    out.push(b'}');
}

fn list<T>(out: &mut Vec<u8>, items: &[T], mut item: impl FnMut(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(out, it);
    }
    out.push(b']');
}

fn key(out: &mut Vec<u8>, key: &str) {
    string(out, key);
    out.push(b':');
}

/// Escaped as the executor's serializer (serde_json) escapes.
fn string(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

fn uuid(out: &mut Vec<u8>, u: Uuid) {
    out.push(b'"');
    out.extend_from_slice(u.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
    out.push(b'"');
}

fn number(out: &mut Vec<u8>, n: impl Into<i64>) {
    out.extend_from_slice(n.into().to_string().as_bytes());
}

fn boolean(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

/// `DateTime` as async-graphql writes it (`to_rfc3339`).
fn time(out: &mut Vec<u8>, t: Option<chrono::DateTime<chrono::Utc>>) {
    match t {
        None => out.extend_from_slice(b"null"),
        Some(t) => string(out, &t.to_rfc3339()),
    }
}

fn optional<T>(out: &mut Vec<u8>, v: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        None => out.extend_from_slice(b"null"),
        Some(v) => write(out, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(query: &str) -> Option<Plan> {
        compile(&async_graphql::parser::parse_query(query).unwrap(), None)
    }

    #[test]
    fn fragments_aliases_and_repeated_fields_compile() {
        let plan = plan(
            "query Q($id: UUID!, $n: Int = 2) { __typename a: installation(id: $id) { ...I health
               ... on Installation { paused id } recent: operations(first: $n) { nodes { id status } }
               failed: operations(first: 5, status: \"failed\") { nodes { id } }
               connection { status } connection { failureReason } } }
             fragment I on Installation { id groupRef __typename }",
        )
        .expect("compiled");
        let RootKind::Installation { fields, .. } = &plan.roots[1].kind else { panic!("{plan:?}") };
        let keys: Vec<&str> = fields.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["id", "groupRef", "__typename", "health", "paused", "recent", "failed", "connection"]);
        let connection = fields.iter().find(|f| f.key == "connection").unwrap();
        assert_eq!(connection.fields.len(), 2, "merged");
        let variables = Variables::from_json(serde_json::json!({"id": Uuid::nil()}));
        let bound = plan.bind(&variables, 10_000).expect("bound");
        assert_eq!(bound.reads[0].operations.len(), 2);
    }

    #[test]
    fn what_the_executor_must_answer_does_not_compile() {
        for query in [
            "mutation { pauseInstallation(id: \"x\") { id } }",
            "{ installation(id: \"x\") { readStates { object } } }",
            "{ installation(id: \"x\") { id @include(if: true) } }",
            "query($f: InstallationFilter) { installations(filter: $f) { nodes { id } } }",
            "{ installations(last: 2) { nodes { id } } }",
            "{ a: installation(id: \"x\") { id } a: installations { nodes { id } } }",
            "{ installation(id: \"x\") { ... on Connection { id } } }",
            "subscription { operationUpdates { id } }",
        ] {
            assert!(plan(query).is_none(), "{query}");
        }
    }

    /// Fragments spread twice at each of 40 levels would inline 2^40 fields: the compile
    /// gives up past `MAX_FIELDS` and leaves the query to the executor.
    #[test]
    fn fragments_that_multiply_do_not_compile() {
        let mut query = String::from("{ installation(id: \"x\") { ...F0 } }");
        for level in 0..40 {
            query
                .push_str(&format!(" fragment F{level} on Installation {{ ...F{next} ...F{next} }}", next = level + 1));
        }
        query.push_str(" fragment F40 on Installation { id }");
        assert!(plan(&query).is_none());
    }
}
