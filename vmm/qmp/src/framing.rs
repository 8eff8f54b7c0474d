//! Wire framing.
//!
//! Input: [`JsonStreamer`] is a byte-level JSON lexer modelled on QEMU's
//! `json-lexer.c` + `json-streamer.c`. It needs no newlines, accepts a message
//! split over many reads or several messages in one read, and hands each
//! complete top-level value to `serde_json`. A lexical error (a control
//! character other than `\t \r \n`, a `0xFE`/`0xFF` byte, a character that can
//! start no token, or a control character inside a string) yields an error and
//! resets the message; the lexer then skips input until a structural character
//! or line end, which is the recovery the QMP spec documents.
//!
//! Output: [`encode_line`] writes one compact JSON object, ASCII only
//! (`\uXXXX` escapes), ending with `\r\n`.

use serde::Serialize;
use serde_json::Value;

/// Default bound on the bytes of one message (tokens, not whitespace).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;
/// Default bound on `{`/`[` nesting; below `serde_json`'s recursion limit.
pub const DEFAULT_MAX_NESTING: usize = 100;
/// Longest token text quoted in a "stray" error message.
const MAX_STRAY_QUOTE: usize = 128;

/// One unit of input, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A complete top-level JSON value (not necessarily an object).
    Value(Value),
    /// A parse/lexical/limit error; the text is the `desc` of a `GenericError`.
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Start,
    Str { quote: u8, escape: bool },
    Number,
    Keyword,
    Recovery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Other,
}

/// Streaming splitter of JSON messages; feed it bytes, collect [`Frame`]s.
#[derive(Debug)]
pub struct JsonStreamer {
    state: Lex,
    /// Raw bytes of the token being lexed (kept for error messages).
    token: Vec<u8>,
    /// Normalised text of the message so far (single-quoted strings rewritten).
    msg: Vec<u8>,
    braces: i64,
    brackets: i64,
    /// A limit was exceeded: lex (to find the message's end) but keep nothing.
    discard: bool,
    max_message: usize,
    max_nesting: usize,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_NESTING)
    }
}

impl JsonStreamer {
    pub fn new(max_message: usize, max_nesting: usize) -> Self {
        Self {
            state: Lex::Start,
            token: Vec::new(),
            msg: Vec::new(),
            braces: 0,
            brackets: 0,
            discard: false,
            max_message,
            max_nesting,
        }
    }

    /// Feed bytes; complete messages and errors are appended to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Frame>) {
        for &b in input {
            self.feed_byte(b, out);
        }
    }

    /// True when no partial message is buffered (the tests' check that a split is clean).
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.state == Lex::Start && self.braces == 0 && self.brackets == 0 && !self.discard
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        // Loop only for "lookahead": a byte that ends a number/keyword token,
        // or ends recovery, is processed again in the Start state.
        loop {
            match self.state {
                Lex::Start => {
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {}
                        b'{' => self.token_done(Tok::LCurly, b"{", out),
                        b'}' => self.token_done(Tok::RCurly, b"}", out),
                        b'[' => self.token_done(Tok::LSquare, b"[", out),
                        b']' => self.token_done(Tok::RSquare, b"]", out),
                        b',' => self.token_done(Tok::Other, b",", out),
                        b':' => self.token_done(Tok::Other, b":", out),
                        b'"' | b'\'' => {
                            self.state = Lex::Str {
                                quote: b,
                                escape: false,
                            };
                            self.push_token(b, out);
                        }
                        b'0'..=b'9' | b'-' => {
                            self.state = Lex::Number;
                            self.push_token(b, out);
                        }
                        b'a'..=b'z' => {
                            self.state = Lex::Keyword;
                            self.push_token(b, out);
                        }
                        _ => {
                            self.token.push(b);
                            self.lexical_error(out);
                        }
                    }
                    return;
                }
                Lex::Str { quote, escape } => {
                    if !(0x20..=0xFD).contains(&b) {
                        self.token.push(b);
                        self.lexical_error(out);
                    } else if escape {
                        self.state = Lex::Str {
                            quote,
                            escape: false,
                        };
                        self.push_token(b, out);
                    } else if b == b'\\' {
                        self.state = Lex::Str {
                            quote,
                            escape: true,
                        };
                        self.push_token(b, out);
                    } else {
                        self.push_token(b, out);
                        if b == quote {
                            self.finish_token(out);
                        }
                    }
                    return;
                }
                Lex::Number => {
                    if matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                        self.push_token(b, out);
                        return;
                    }
                    self.finish_token(out);
                }
                Lex::Keyword => {
                    if b.is_ascii_lowercase() {
                        self.push_token(b, out);
                        return;
                    }
                    self.finish_token(out);
                }
                Lex::Recovery => {
                    match b {
                        // Structural characters and line ends resynchronise
                        // and are processed as input.
                        b'{' | b'}' | b'[' | b']' | b'\r' | b'\n' => self.state = Lex::Start,
                        // Other control characters and impossible UTF-8 bytes
                        // resynchronise and are swallowed.
                        0x00..=0x1F | 0xFE | 0xFF if b != b'\t' => {
                            self.state = Lex::Start;
                            return;
                        }
                        _ => return,
                    }
                }
            }
        }
    }

    /// The current string/number/keyword token is complete.
    fn finish_token(&mut self, out: &mut Vec<Frame>) {
        self.state = Lex::Start;
        let token = std::mem::take(&mut self.token);
        self.token_done(Tok::Other, &token, out);
        self.token = token;
        self.token.clear();
    }

    /// Append one byte to the current token, enforcing the size bound.
    fn push_token(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.discard {
            return;
        }
        self.token.push(b);
        if self.msg.len() + self.token.len() > self.max_message {
            self.limit_error("JSON token size limit exceeded", out);
        }
    }

    /// A complete token: account for nesting, append it, maybe emit.
    fn token_done(&mut self, kind: Tok, text: &[u8], out: &mut Vec<Frame>) {
        match kind {
            Tok::LCurly => self.braces += 1,
            Tok::RCurly => self.braces -= 1,
            Tok::LSquare => self.brackets += 1,
            Tok::RSquare => self.brackets -= 1,
            Tok::Other => {}
        }
        if !self.discard {
            if !self.msg.is_empty() {
                // Keeps adjacent scalars apart ("[1 2]" must not become "[12]").
                self.msg.push(b' ');
            }
            append_normalised(&mut self.msg, text);
            if self.msg.len() > self.max_message {
                self.limit_error("JSON token size limit exceeded", out);
            } else if depth(self.braces) + depth(self.brackets) > self.max_nesting {
                self.limit_error("JSON nesting depth limit exceeded", out);
            }
        }
        if self.braces < 0 || self.brackets < 0 || (self.braces == 0 && self.brackets == 0) {
            if !self.discard {
                out.push(parse_message(&self.msg));
            }
            self.reset_message();
        }
    }

    /// Report a limit and drop the rest of this message (its nesting is still
    /// tracked so that the next message starts cleanly).
    fn limit_error(&mut self, what: &str, out: &mut Vec<Frame>) {
        out.push(Frame::Error(what.to_owned()));
        self.discard = true;
        self.msg = Vec::new();
        self.token = Vec::new();
    }

    fn lexical_error(&mut self, out: &mut Vec<Frame>) {
        let shown = &self.token[..self.token.len().min(MAX_STRAY_QUOTE)];
        out.push(Frame::Error(format!(
            "JSON parse error, stray '{}'",
            String::from_utf8_lossy(shown)
        )));
        self.token.clear();
        self.reset_message();
        self.state = Lex::Recovery;
    }

    fn reset_message(&mut self) {
        self.braces = 0;
        self.brackets = 0;
        self.discard = false;
        if self.msg.capacity() > 64 * 1024 {
            self.msg = Vec::new();
        } else {
            self.msg.clear();
        }
    }
}

fn depth(count: i64) -> usize {
    usize::try_from(count).unwrap_or(0)
}

/// Append a token, rewriting QEMU's extensions into standard JSON:
/// single-quoted strings become double-quoted, and `\'` becomes `'`.
fn append_normalised(msg: &mut Vec<u8>, token: &[u8]) {
    match token.first() {
        Some(b'\'') => {
            msg.push(b'"');
            let body = &token[1..token.len() - 1];
            let mut escape = false;
            for &c in body {
                if escape {
                    escape = false;
                    if c == b'\'' {
                        msg.push(b'\'');
                    } else {
                        msg.extend_from_slice(&[b'\\', c]);
                    }
                } else if c == b'\\' {
                    escape = true;
                } else if c == b'"' {
                    msg.extend_from_slice(b"\\\"");
                } else {
                    msg.push(c);
                }
            }
            msg.push(b'"');
        }
        Some(b'"') if token.windows(2).any(|w| w == b"\\'") => {
            let mut escape = false;
            for &c in token {
                if escape {
                    escape = false;
                    if c == b'\'' {
                        msg.push(b'\'');
                    } else {
                        msg.extend_from_slice(&[b'\\', c]);
                    }
                } else if c == b'\\' {
                    escape = true;
                } else {
                    msg.push(c);
                }
            }
        }
        _ => msg.extend_from_slice(token),
    }
}

fn parse_message(msg: &[u8]) -> Frame {
    match serde_json::from_slice::<Value>(msg) {
        Ok(v) => Frame::Value(v),
        Err(e) => Frame::Error(format!("JSON parse error, {}", describe_parse_error(&e))),
    }
}

/// serde_json's message without its "at line L column C" suffix, with the
/// most common case worded as QEMU words it.
fn describe_parse_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    match text {
        "expected value" | "EOF while parsing a value" => "expecting value".to_owned(),
        other => other.to_owned(),
    }
}

/// Serialize `value` as one compact, ASCII-only line ending in `\r\n`.
pub fn encode_line<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let json = serde_json::to_string(value).expect("QMP messages always serialize");
    let mut out = Vec::with_capacity(json.len() + 2);
    for c in json.chars() {
        if c.is_ascii() && c != '\x7f' {
            out.push(c as u8);
        } else {
            // Outside string literals serde_json emits only ASCII, so every
            // such character is inside a string and may be escaped.
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.extend_from_slice(format!("\\u{unit:04X}").as_bytes());
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(input: &[u8]) -> Vec<Frame> {
        let mut s = JsonStreamer::default();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn err(s: &str) -> Frame {
        Frame::Error(s.to_owned())
    }

    #[test]
    fn splits_concatenated_and_split_objects_at_every_boundary() {
        let input = br#"{"execute": "a", "id": [1, {"x": "}{"}]}  {'execute':'b'}"#;
        let want = vec![
            Frame::Value(json!({"execute": "a", "id": [1, {"x": "}{"}]})),
            Frame::Value(json!({"execute": "b"})),
        ];
        assert_eq!(run(input), want);
        for cut in 0..input.len() {
            let mut s = JsonStreamer::default();
            let mut out = Vec::new();
            s.feed(&input[..cut], &mut out);
            s.feed(&input[cut..], &mut out);
            assert_eq!(out, want, "cut at {cut}");
        }
    }

    #[test]
    fn single_quoted_strings_and_apostrophe_escape() {
        assert_eq!(
            run(br#"{'a': 'say "hi"', 'b': 'it\'s', "c": "it\'s", 'd': '\u00e9\n'}"#),
            vec![Frame::Value(
                json!({"a": "say \"hi\"", "b": "it's", "c": "it's", "d": "\u{e9}\n"})
            )]
        );
    }

    #[test]
    fn top_level_scalars_are_messages() {
        assert_eq!(
            run(b"\"str\" [1,2] 42 "),
            vec![
                Frame::Value(json!("str")),
                Frame::Value(json!([1, 2])),
                Frame::Value(json!(42))
            ]
        );
        // Adjacent scalars are not glued together.
        assert_eq!(
            run(b"[1 2]"),
            vec![err("JSON parse error, expected `,` or `]`")]
        );
    }

    #[test]
    fn parse_errors_match_qemu() {
        assert_eq!(
            run(br#"{"execute": }"#),
            vec![err("JSON parse error, expecting value")]
        );
        assert_eq!(run(b"}"), vec![err("JSON parse error, expecting value")]);
    }

    #[test]
    fn lexical_error_resets_and_recovers() {
        assert_eq!(
            run(b"\x01{\"a\":1}"),
            vec![
                err("JSON parse error, stray '\u{1}'"),
                Frame::Value(json!({"a": 1}))
            ]
        );
        // A control byte rescues a client stuck inside a string.
        assert_eq!(
            run(b"{\"execute\": \"unterminated\x01{\"a\":1}"),
            vec![
                err("JSON parse error, stray '\"unterminated\u{1}'"),
                Frame::Value(json!({"a": 1}))
            ]
        );
        // 0xFF inside a string: two errors, as observed on QEMU 7.2.
        assert_eq!(
            run(b"{\"execute\": \"\xffquery-status\"}"),
            vec![
                err("JSON parse error, stray '\"\u{FFFD}'"),
                err("JSON parse error, expecting value")
            ]
        );
    }

    #[test]
    fn size_and_nesting_limits_drop_only_that_message() {
        let mut s = JsonStreamer::new(64, 4);
        let mut out = Vec::new();
        let big = format!(
            r#"{{"execute": "x", "arguments": {{"s": "{}"}}}}"#,
            "y".repeat(200)
        );
        s.feed(big.as_bytes(), &mut out);
        s.feed(br#"{"a": 1}"#, &mut out);
        s.feed(b"[[[[[[1]]]]]]", &mut out);
        s.feed(br#"{"b": [[["ok"]]]}"#, &mut out);
        assert_eq!(
            out,
            vec![
                err("JSON token size limit exceeded"),
                Frame::Value(json!({"a": 1})),
                err("JSON nesting depth limit exceeded"),
                Frame::Value(json!({"b": [[["ok"]]]})),
            ]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn default_nesting_limit_is_parseable() {
        let depth = DEFAULT_MAX_NESTING;
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(matches!(run(text.as_bytes())[..], [Frame::Value(_)]));
        let text = format!("{}{}", "[".repeat(depth + 1), "]".repeat(depth + 1));
        assert_eq!(
            run(text.as_bytes()),
            vec![err("JSON nesting depth limit exceeded")]
        );
    }

    #[test]
    fn encode_is_ascii_crlf_compact() {
        let line = encode_line(&json!({"a": "caf\u{e9} \u{1F600}\n\u{7f}", "b": [1, 2]}));
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"a\":\"caf\\u00E9 \\uD83D\\uDE00\\n\\u007F\",\"b\":[1,2]}\r\n"
        );
    }
}
