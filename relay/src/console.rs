//! The pilot console: the static files of `client-web/`, embedded in the binary.

use rust_embed::RustEmbed;
use warp::http::{HeaderValue, Response, StatusCode, header};

#[derive(RustEmbed)]
#[folder = "../client-web/"]
#[exclude = "e2e/*"]
struct Assets;

/// Serves `path` from the embedded console, `index.html` for `/`. Unknown paths get 404.
pub fn serve(path: &str) -> Response<Vec<u8>> {
    let path = path.trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match Assets::get(path) {
        Some(file) => {
            let mime = mime_guess::from_path(path).first_or_octet_stream();
            let mut r = Response::new(file.data.into_owned());
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(mime.as_ref()) {
                h.insert(header::CONTENT_TYPE, v);
            }
            // The console is tiny; always revalidate so an upgraded relay serves new code.
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
            r
        }
        None => {
            let mut r = Response::new(b"not found".to_vec());
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// Whether the console has a file at `path` (used to tell the console apart from API 404s).
pub fn has(path: &str) -> bool {
    let path = path.trim_start_matches('/');
    path.is_empty() || Assets::get(path).is_some()
}
