//! The small slice of HTTP/1.1 the control API speaks: one request per connection, JSON
//! bodies framed by `Content-Length`. httparse does the parsing; responses are written here.

use std::fmt::Write as _;

/// Requests larger than this are refused; the API's bodies are a few dozen bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// How many of the bytes parsed it took: any after it are another request.
    pub wire_len: usize,
}

/// The bytes read so far are not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed HTTP: {0}")]
    Malformed(String),
    #[error("request larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("the client closed its side after {received} bytes, before the end of its request{}",
        expected.map(|n| format!(" ({n} bytes with the body its Content-Length announces)")).unwrap_or_default())]
    CutShort {
        received: usize,
        expected: Option<usize>,
    },
}

/// Parses `buf`; `Ok(None)` means more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    if buf.len() > MAX_REQUEST_BYTES {
        return Err(HttpError::TooLarge);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let body_len = content_length(req.headers)?;
    // Any Content-Length parses, up to usize::MAX: the sum must not wrap.
    let wire_len = head_len.saturating_add(body_len);
    if wire_len > MAX_REQUEST_BYTES {
        return Err(HttpError::TooLarge);
    }
    if buf.len() < wire_len {
        return Ok(None);
    }
    Ok(Some(Request {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        body: buf[head_len..wire_len].to_vec(),
        wire_len,
    }))
}

/// Why `buf`, everything a client sent before it closed its side, is not a request: it was
/// cut short (or it is malformed, or too large, as [`parse_request`] says).
pub fn cut_short(buf: &[u8]) -> HttpError {
    match parse_request(buf) {
        Err(e) => e,
        Ok(_) => {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let expected = match req.parse(buf) {
                Ok(httparse::Status::Complete(head_len)) => content_length(req.headers)
                    .ok()
                    .map(|body_len| head_len.saturating_add(body_len)),
                _ => None,
            };
            HttpError::CutShort {
                received: buf.len(),
                expected,
            }
        }
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, HttpError> {
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed(
                "chunked bodies are not supported; send Content-Length".into(),
            ));
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            return std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| HttpError::Malformed("bad Content-Length".into()));
        }
    }
    Ok(0)
}

/// A response: status, optional JSON body, and for `405` the allowed methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
    pub allow: Option<&'static str>,
}

impl Response {
    /// A response with a JSON body.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_string(value) {
            Ok(body) => Response {
                status,
                body: Some(body),
                allow: None,
            },
            Err(e) => Response::error(500, &format!("cannot encode reply: {e}")),
        }
    }

    /// A response with no body.
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            body: None,
            allow: None,
        }
    }

    /// An error response: `{"error": "..."}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    /// The bytes on the wire. Every response closes the connection.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.body.as_deref().unwrap_or("");
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        let _ = write!(
            head,
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Parses a complete response (the server closes after it): status and body.
pub fn parse_response(buf: &[u8]) -> Result<(u16, String), HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(HttpError::Malformed("response ended early".into()))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let body_len = content_length(resp.headers)?;
    let body = buf
        .get(head_len..head_len + body_len)
        .ok_or_else(|| HttpError::Malformed("response body ended early".into()))?;
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

/// Builds a request as the CLI client sends it.
pub fn request_bytes(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let body = body.unwrap_or("");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_parsed_once_complete() {
        let bytes = request_bytes("PUT", "/vm/save", Some(r#"{"export_path":"/tmp/s"}"#));
        for cut in [0, 5, bytes.len() - 1] {
            assert_eq!(parse_request(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let req = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/vm/save");
        assert_eq!(req.body, br#"{"export_path":"/tmp/s"}"#);
    }

    #[test]
    fn a_request_cut_short_says_how_far_it_got() {
        let bytes = request_bytes("PUT", "/vm/pause", Some("{\"a\":1}"));
        let whole = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(whole.wire_len, bytes.len());
        let cut = &bytes[..bytes.len() - 3];
        assert_eq!(
            cut_short(cut),
            HttpError::CutShort {
                received: bytes.len() - 3,
                expected: Some(bytes.len()),
            }
        );
        assert!(cut_short(cut)
            .to_string()
            .contains("with the body its Content-Length announces"));
        assert_eq!(
            cut_short(b"PUT /vm"),
            HttpError::CutShort {
                received: 7,
                expected: None,
            }
        );
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        assert!(matches!(
            parse_request(b"\x01\x02 nonsense\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        let huge = format!(
            "PUT /vm/save HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_REQUEST_BYTES
        );
        assert_eq!(parse_request(huge.as_bytes()), Err(HttpError::TooLarge));
        assert_eq!(
            parse_request(b"PUT /vm HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n"),
            Err(HttpError::TooLarge)
        );
        assert!(matches!(
            parse_request(b"PUT /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn responses_round_trip() {
        let resp = Response::json(200, &serde_json::json!({"phase": "running"}));
        let (status, body) = parse_response(&resp.to_bytes()).unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, r#"{"phase":"running"}"#);

        let mut not_allowed = Response::error(405, "use PUT");
        not_allowed.allow = Some("PUT");
        let text = String::from_utf8(not_allowed.to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Allow: PUT\r\n"));

        let (status, body) = parse_response(&Response::empty(204).to_bytes()).unwrap();
        assert_eq!((status, body.as_str()), (204, ""));

        // Every status the API sends has its own reason phrase.
        for (status, phrase) in [
            (408, "Request Timeout"),
            (409, "Conflict"),
            (500, "Internal Server Error"),
        ] {
            let text = String::from_utf8(Response::error(status, "x").to_bytes()).unwrap();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status} {phrase}\r\n")),
                "{text}"
            );
        }
    }
}
