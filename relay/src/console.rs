//! The pilot console: the static files of `client-web/`, embedded in the binary.
//!
//! `index.html` carries the console's Content-Security-Policy. With `--map-tiles` the relay
//! adds the tile server's origin to its `img-src` as it serves the page, so the one file works
//! with and without a map; every other file, and `index.html` without the flag, is served
//! byte for byte as embedded.

use rust_embed::RustEmbed;
use warp::http::{HeaderValue, Response, StatusCode, header};

#[derive(RustEmbed)]
#[folder = "../client-web/"]
#[exclude = "e2e/*"]
struct Assets;

/// The policy text `index.html` must contain for [`serve`] to extend `img-src`.
pub const IMG_SRC: &str = "img-src 'self' data:";

/// Serves `path` from the embedded console, `index.html` for `/`. Unknown paths get 404.
/// `img_origin` (a CSP source such as `https://tile.openstreetmap.org`) is appended to the
/// `img-src` of `index.html`'s policy.
pub fn serve(path: &str, img_origin: Option<&str>) -> Response<Vec<u8>> {
    let path = path.trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match Assets::get(path) {
        Some(file) => {
            let mime = mime_guess::from_path(path).first_or_octet_stream();
            let mut body = file.data.into_owned();
            if path == "index.html"
                && let Some(origin) = img_origin
            {
                body = allow_images_from(body, origin);
            }
            let mut r = Response::new(body);
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

/// `page` with `origin` appended to the first [`IMG_SRC`] in it. A page without that text is
/// returned unchanged (and the map's tiles will be blocked: logged).
fn allow_images_from(page: Vec<u8>, origin: &str) -> Vec<u8> {
    let needle = IMG_SRC.as_bytes();
    let Some(at) = page.windows(needle.len()).position(|w| w == needle) else {
        tracing::warn!(
            "index.html has no \"{IMG_SRC}\" in its Content-Security-Policy; map tiles from {origin} will be blocked"
        );
        return page;
    };
    let end = at + needle.len();
    let mut out = Vec::with_capacity(page.len() + origin.len() + 1);
    out.extend_from_slice(&page[..end]);
    out.push(b' ');
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(&page[end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img_src_gets_the_origin_once() {
        let page = b"<meta content=\"default-src 'self'; img-src 'self' data:; x\"> img-src 'self' data:".to_vec();
        let out = String::from_utf8(allow_images_from(page, "https://t.example")).unwrap();
        assert_eq!(
            out,
            "<meta content=\"default-src 'self'; img-src 'self' data: https://t.example; x\"> img-src 'self' data:"
        );
        assert_eq!(allow_images_from(b"no policy".to_vec(), "https://t.example"), b"no policy");
    }
}
