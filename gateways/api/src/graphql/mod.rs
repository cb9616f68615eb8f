//! The GraphQL schema: queries over the read models and the log, mutations through the
//! command service, the `operationUpdates` subscription, and the limits every request runs
//! under.

pub mod compiled;
pub mod guard;
pub mod loaders;
pub mod mutation;
pub mod query;
pub mod subscription;
pub mod types;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
pub use crate::state::Limits;
use crate::tenant::TenantDb;
use async_graphql::connection::PageInfo;
use async_graphql::dataloader::DataLoader;
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Context, OutputType, Schema, SimpleObject};
use loaders::Loaders;
use std::sync::Arc;
use uuid::Uuid;

pub type AmplogSchema = Schema<query::Query, mutation::Mutation, subscription::Subscription>;

/// How deep an introspection-only query may nest: the standard introspection query
/// (graphql-core's, which gql, codegen tools and IDEs send) nests its type references
/// deeper than the depth limit of data queries; it reads no data.
pub const INTROSPECTION_DEPTH: usize = 20;

pub fn build(state: Arc<AppState>, limits: &Limits) -> AmplogSchema {
    build_with_depth(state, limits, limits.depth)
}

/// The schema that answers introspection-only queries where introspection is on.
pub fn build_introspection(state: Arc<AppState>, limits: &Limits) -> AmplogSchema {
    build_with_depth(state, limits, INTROSPECTION_DEPTH.max(limits.depth))
}

fn build_with_depth(state: Arc<AppState>, limits: &Limits, depth: usize) -> AmplogSchema {
    let mut builder = Schema::build(query::Query, mutation::Mutation, subscription::Subscription)
        .data(state)
        .limit_depth(depth)
        .limit_complexity(limits.complexity)
        .limit_recursive_depth(limits.recursive_depth);
    if !limits.introspection {
        builder = builder.disable_introspection();
    }
    builder.finish()
}

/// A client-chosen name as a span attribute: at most 64 bytes of it (the field names
/// are not checked against the schema yet, the operation's name never is).
pub fn span_name(name: &str) -> &str {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// What a checked request runs, for its span: the operation's kind (`query`, `mutation`,
/// `subscription`) and its root fields, comma-separated (at most 8).
pub fn describe(request: &mut async_graphql::Request) -> (&'static str, String) {
    use async_graphql::parser::types::{DocumentOperations, OperationType, Selection};
    let name = request.operation_name.clone();
    let Ok(doc) = request.parsed_query() else { return ("unknown", String::new()) };
    let operation = match &doc.operations {
        DocumentOperations::Single(op) => Some(op),
        DocumentOperations::Multiple(ops) => match &name {
            Some(name) => ops.iter().find(|(n, _)| n.as_str() == name).map(|(_, op)| op),
            None => ops.values().next(),
        },
    };
    let Some(operation) = operation else { return ("unknown", String::new()) };
    let kind = match operation.node.ty {
        OperationType::Query => "query",
        OperationType::Mutation => "mutation",
        OperationType::Subscription => "subscription",
    };
    let fields: Vec<&str> = operation
        .node
        .selection_set
        .node
        .items
        .iter()
        .filter_map(|item| match &item.node {
            Selection::Field(field) => Some(span_name(field.node.name.node.as_str())),
            _ => None,
        })
        .take(8)
        .collect();
    (kind, fields.join(","))
}

/// The schema as SDL (committed as `gateways/api/schema.graphql`; a test keeps the two equal).
pub fn sdl() -> String {
    Schema::build(query::Query, mutation::Mutation, subscription::Subscription).finish().sdl()
}

/// What one request brings to its resolvers.
pub fn request_data(
    request: async_graphql::Request,
    principal: Principal,
    db: Arc<TenantDb>,
    idempotency_key: Option<String>,
) -> async_graphql::Request {
    let loader = DataLoader::new(Loaders { db: db.clone() }, tokio::spawn);
    request.data(principal).data(db).data(loader).data(IdempotencyKey(idempotency_key))
}

/// The `Idempotency-Key` header of the request, if any.
pub struct IdempotencyKey(pub Option<String>);

pub(crate) fn app<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<Arc<AppState>>()
}

pub(crate) fn principal<'a>(ctx: &Context<'a>) -> &'a Principal {
    ctx.data_unchecked::<Principal>()
}

pub(crate) fn db<'a>(ctx: &Context<'a>) -> &'a Arc<TenantDb> {
    ctx.data_unchecked::<Arc<TenantDb>>()
}

pub(crate) fn loader<'a>(ctx: &Context<'a>) -> &'a DataLoader<Loaders> {
    ctx.data_unchecked::<DataLoader<Loaders>>()
}

/// Times a request may name: years 1 to 9999 (chrono takes more than PostgreSQL's
/// `timestamptz`, which would fail the statement, or cut a stream already begun).
pub fn check_times(times: &[(&str, Option<chrono::DateTime<chrono::Utc>>)]) -> Result<(), ApiError> {
    use chrono::Datelike;
    for (name, time) in times {
        if let Some(t) = time.filter(|t| !(1..=9999).contains(&t.year())) {
            return Err(ApiError::bad_request(
                "invalid_input",
                format!("`{name}` ({t}) must be a time between the years 1 and 9999"),
            ));
        }
    }
    Ok(())
}

/// Cursors are the ids of the read models' rows (UUIDv7: they sort by creation time).
pub(crate) fn parse_cursor(s: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(s).map_err(|_| ApiError::bad_request("invalid_cursor", format!("`{s}` is not a cursor")))
}

/// A page of a list read newest first; `pageInfo.endCursor` is the `after` of the next
/// page (only forward paging: `hasPreviousPage` is always false).
#[derive(SimpleObject)]
#[graphql(concrete(name = "OperationPage", params(types::Operation)))]
pub struct Page<T: OutputType> {
    pub nodes: Vec<T>,
    pub page_info: PageInfo,
}

impl<T: OutputType> Page<T> {
    /// `docs` holds up to `first + 1` rows: the extra one only says that more follow.
    pub fn of<D: Into<T>>(mut docs: Vec<D>, first: i64, id: impl Fn(&D) -> Uuid) -> Self {
        let has_next_page = docs.len() as i64 > first;
        docs.truncate(first.max(0) as usize);
        let page_info = PageInfo {
            has_previous_page: false,
            has_next_page,
            start_cursor: docs.first().map(|d| id(d).to_string()),
            end_cursor: docs.last().map(|d| id(d).to_string()),
        };
        Page { nodes: docs.into_iter().map(Into::into).collect(), page_info }
    }
}

/// What the request handler checks before executing a query.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QueryShape {
    /// Aliased fields (fragments included, each counted where it is defined): many aliases
    /// of one expensive field are how a small query asks for a lot of work.
    pub aliases: usize,
    /// Whether it selects `__schema` or `__type` (refused outright in production, rather
    /// than answered with nulls as async-graphql does).
    pub introspection: bool,
    /// Whether its operations select nothing but `__schema`, `__type` and `__typename`.
    pub introspection_only: bool,
}

pub fn shape(doc: &ExecutableDocument) -> QueryShape {
    fn walk(set: &SelectionSet, shape: &mut QueryShape) {
        for item in &set.items {
            match &item.node {
                Selection::Field(f) => {
                    shape.aliases += f.node.alias.is_some() as usize;
                    shape.introspection |= matches!(f.node.name.node.as_str(), "__schema" | "__type");
                    walk(&f.node.selection_set.node, shape);
                }
                Selection::InlineFragment(f) => walk(&f.node.selection_set.node, shape),
                Selection::FragmentSpread(_) => {}
            }
        }
    }
    let mut shape = QueryShape { introspection_only: true, ..QueryShape::default() };
    for (_, op) in doc.operations.iter() {
        walk(&op.node.selection_set.node, &mut shape);
        shape.introspection_only &= op.node.selection_set.node.items.iter().all(|item| match &item.node {
            Selection::Field(f) => f.node.name.node.starts_with("__"),
            _ => false,
        });
    }
    for fragment in doc.fragments.values() {
        walk(&fragment.node.selection_set.node, &mut shape);
    }
    shape
}

#[cfg(test)]
mod tests {
    /// The committed SDL is the schema: a change to the API shows up in review as a change
    /// of this file (`amplog schema --sdl > gateways/api/schema.graphql`).
    #[test]
    fn the_committed_sdl_is_the_schema() {
        let committed = include_str!("../../schema.graphql");
        assert!(
            super::sdl() == committed,
            "the schema changed: run `amplog schema --sdl > gateways/api/schema.graphql`"
        );
    }
}

#[cfg(test)]
mod span_tests {
    /// Names a client chooses are cut to 64 bytes, on a character boundary.
    #[test]
    fn client_names_in_spans_are_bounded() {
        assert_eq!(super::span_name("triggerRead"), "triggerRead");
        assert_eq!(super::span_name(&"a".repeat(100_000)).len(), 64);
        let wide = "é".repeat(100);
        let cut = super::span_name(&wide);
        assert!(cut.len() <= 64 && cut.chars().all(|c| c == 'é'));
    }
}
