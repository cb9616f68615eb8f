//! GraphiQL for `serve --dev`: amplog's page and the GraphiQL and React builds it loads,
//! embedded in the binary (`assets/graphiql/`, gzipped) and served by amplog, so the IDE
//! works with no third-party network.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

/// The page at `GET /graphql`.
pub const PAGE: &str = include_str!("../assets/graphiql/index.html");

/// The assets under `/graphql/assets/`: name, content type, gzipped bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("graphiql.min.js", "text/javascript; charset=utf-8", include_bytes!("../assets/graphiql/graphiql.min.js.gz")),
    ("graphiql.min.css", "text/css; charset=utf-8", include_bytes!("../assets/graphiql/graphiql.min.css.gz")),
    (
        "react.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/react.production.min.js.gz"),
    ),
    (
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/react-dom.production.min.js.gz"),
    ),
];

/// An asset, gzip-encoded (every browser takes it), or `None` for an unknown name.
pub fn asset(name: &str) -> Option<Response> {
    let (_, content_type, bytes) = ASSETS.iter().find(|(n, _, _)| *n == name)?;
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CONTENT_ENCODING, HeaderValue::from_static("gzip")),
        (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400")),
    ];
    Some((headers, *bytes).into_response())
}
