//! What every GraphQL request passes before anything recursive sees it, over HTTP and over
//! WebSocket alike: the nesting of its query text and of its variables (async-graphql's
//! parser recurses on values without a limit, so a 4 KB `[[[…]]]` overflows a worker's
//! stack), the parse itself (cached by query text), the alias count and introspection.

use crate::error::ApiError;
use crate::state::{Limits, ParsedCache};
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType};
use async_graphql::{Request, Value as ConstValue};

/// Deepest nesting of `{`, `[` and `(` in a query, and of lists and objects in variables.
/// The depth limit (10 fields) and the recursion limit (32) are far below it.
pub const MAX_NESTING: usize = 64;

/// Longer queries are parsed every time rather than cached.
const MAX_CACHED_QUERY: usize = 16 * 1024;

pub fn parsed_cache(bytes: u64) -> ParsedCache {
    moka::sync::Cache::builder()
        .weigher(|query: &String, _: &ExecutableDocument| u32::try_from(query.len() * 48).unwrap_or(u32::MAX))
        .max_capacity(bytes)
        .build()
}

/// A request that passed, whether it is a subscription, and whether it only introspects.
pub struct Checked {
    pub request: Request,
    pub subscription: bool,
    pub introspection_only: bool,
}

/// Checks a request's shape before it is executed. `introspection` says whether this server
/// answers `__schema`/`__type`.
pub fn check(mut request: Request, limits: &Limits, cache: &ParsedCache) -> Result<Checked, ApiError> {
    let depth = text_nesting(&request.query, MAX_NESTING);
    if depth > MAX_NESTING {
        return Err(too_deep("the query"));
    }
    if request.variables.values().any(|v| value_nesting(v, 1) > MAX_NESTING) {
        return Err(too_deep("the variables"));
    }
    // Clients repeat a few queries. A syntax error is left to the executor, which reports
    // it as GraphQL clients expect.
    if let Some(doc) = cache.get(&request.query) {
        request.set_parsed_query(doc);
    } else if request.query.len() <= MAX_CACHED_QUERY {
        let text = request.query.clone();
        if let Ok(doc) = request.parsed_query() {
            cache.insert(text, doc.clone());
        }
    }
    let operation = request.operation_name.clone();
    let Ok(doc) = request.parsed_query() else {
        return Ok(Checked { request, subscription: false, introspection_only: false });
    };
    let shape = super::shape(doc);
    if shape.aliases > limits.aliases {
        return Err(ApiError::bad_request(
            "too_many_aliases",
            format!("the query has {} aliases; at most {} are allowed", shape.aliases, limits.aliases),
        ));
    }
    if shape.introspection && !limits.introspection {
        return Err(ApiError::bad_request("introspection_disabled", "schema introspection is off in production mode"));
    }
    let subscription = is_subscription(doc, operation.as_deref());
    let introspection_only = shape.introspection_only && limits.introspection;
    Ok(Checked { request, subscription, introspection_only })
}

fn too_deep(what: &str) -> ApiError {
    ApiError::bad_request("too_deep", format!("{what} nests deeper than {MAX_NESTING} levels"))
}

fn is_subscription(doc: &ExecutableDocument, name: Option<&str>) -> bool {
    let sub = |ty: OperationType| ty == OperationType::Subscription;
    match &doc.operations {
        DocumentOperations::Single(op) => sub(op.node.ty),
        DocumentOperations::Multiple(ops) => match name {
            Some(name) => ops.iter().any(|(n, op)| n.as_str() == name && sub(op.node.ty)),
            None => ops.values().any(|op| sub(op.node.ty)),
        },
    }
}

/// The deepest nesting of `{`, `[` and `(` in GraphQL text, outside strings, block strings
/// and comments; it stops counting once past `limit`. Linear, no recursion.
pub fn text_nesting(text: &str, limit: usize) -> usize {
    let b = text.as_bytes();
    let (mut i, mut depth, mut deepest) = (0, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
            }
            b'"' if b[i..].starts_with(b"\"\"\"") => {
                i += 3;
                while i < b.len() && !b[i..].starts_with(b"\"\"\"") {
                    i += if b[i..].starts_with(b"\\\"\"\"") { 4 } else { 1 };
                }
                i += 2; // the closing quotes' last byte is passed below
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' | b'[' | b'(' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > limit {
                    return deepest;
                }
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

/// How deep a variable's value nests (a scalar is 1); stops descending past the limit.
fn value_nesting(value: &ConstValue, at: usize) -> usize {
    if at > MAX_NESTING {
        return at;
    }
    match value {
        ConstValue::List(items) => items.iter().map(|v| value_nesting(v, at + 1)).max().unwrap_or(at),
        ConstValue::Object(fields) => fields.values().map(|v| value_nesting(v, at + 1)).max().unwrap_or(at),
        _ => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_counts_brackets_outside_strings_and_comments() {
        assert_eq!(text_nesting("{ a(x: [[1]]) { b } }", 64), 4);
        assert_eq!(text_nesting("{ a(x: \"[[[[\\\"[[\") }", 64), 2);
        assert_eq!(text_nesting("{ a(x: \"\"\"[[[ \\\"\"\" [[\"\"\") } # [[[[[\n", 64), 2);
        assert_eq!(text_nesting("# {{{{{{\n{ a }", 64), 1);
        let deep = format!("{{ a(x: {}1{}) }}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(text_nesting(&deep, 64), 65);
        // Unterminated strings and stray closers do not confuse it.
        assert_eq!(text_nesting("}}} { \"[[[", 64), 1);
        assert_eq!(text_nesting("\"\"\"", 64), 0);
    }

    /// 1,000 distinct 15 KiB queries once took the server from 59 to 729 MiB: the cache is
    /// weighed by size and holds at most its capacity.
    #[test]
    fn the_parsed_cache_is_capped_by_weight_not_by_count() {
        let cache = parsed_cache(8 * 1024 * 1024);
        let limits = Limits::default();
        for i in 0..300 {
            let fields: String = (0..3_000).map(|f| format!(" f{f}")).collect();
            let query = format!("query q{i} {{ viewer {{ {} }} }}", &fields[..14_000]);
            check(Request::new(query), &limits, &cache).unwrap();
        }
        cache.run_pending_tasks();
        assert!(cache.weighted_size() <= 8 * 1024 * 1024, "{}", cache.weighted_size());
        assert!(cache.entry_count() < 20, "{} entries", cache.entry_count());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2_000, ..Default::default() })]

        /// Any text is measured without panicking, and what measures within the limit also
        /// parses without overflowing the stack.
        #[test]
        fn any_query_text_is_measured_and_parses_or_is_refused(text in "[\\[\\]{}()\"#a-z:$!@ \n\\\\]{0,400}") {
            if text_nesting(&text, MAX_NESTING) <= MAX_NESTING {
                let _ = async_graphql::parser::parse_query(&text);
            }
        }
    }
}
