//! FHIR R4 search over resources already decrypted in memory: the query string is parsed
//! into [`SearchParams`], resources are kept by [`matches`], ordered by [`sort`] and paged by
//! the caller with `count` and `offset`; [`self_query`] gives back the canonical query for
//! the bundle's links.
//!
//! Nothing here reads a clock or does IO, so the same query over the same resources always
//! gives the same answer.
//!
//! **Parameters** (per type, see [`search_parameters`]): `_id`, `_lastUpdated`, `patient` and
//! `subject` (both name the patient the resource is about), `code`, `category`, `status` and
//! `date`. Result parameters: `_count`, `_offset`, `_sort` (`date`, `_lastUpdated`, `_id`,
//! `status`, `-` for descending), `_include` (the patient only) and `_summary=count`.
//! `_format` and `_pretty` are accepted and left to the caller.
//!
//! **Strictness**: R4 lets a server ignore what it does not understand, but a search that
//! silently drops a filter returns records the client did not ask for, so unknown
//! parameters, modifiers and unsupported values are refused with a [`SearchError`].
//!
//! **Combining**: values separated by `,` are alternatives (OR); a parameter given again is
//! one more condition (AND). [`SearchParams`] keeps one list of ids and one patient, so
//! `_id` may be given once, and `patient`/`subject` name a single patient (repeating the same
//! one is allowed).
//!
//! **Tokens**: `system|code`, `|code` (a coding without a system), `code` (any system) and
//! `system|` (any code of the system), with `\,` `\|` `\$` `\\` as escapes. Codes compare
//! exactly (case-sensitive). Elements of type `code` (`status`,
//! `AllergyIntolerance.category`) carry no system of their own, so only the code of the
//! token is compared there, and `system|` matches any value.
//!
//! **Dates**: a value of precision year, month, day, minute, second or fraction of a second
//! stands for the half-open range of milliseconds (UTC) it covers; a value without a time
//! zone is read as UTC. A Period is the range from its start to the end of its end, open on
//! a missing side. Prefixes follow R4 search (3.1.1.4.x): `eq` the search range contains
//! the target range, `ne` it does not, `gt`/`lt` the target reaches above/below the search
//! range, `ge`/`le` either of the two, `sa`/`eb` the target lies wholly after/before it.
//! R4 defines `ap` relative to the current time, which this module never reads; here `ap`
//! means the target overlaps the search range widened by one day on each side. A resource
//! matches a date filter when any of its date elements does; one without a usable value
//! matches no prefix (not even `ne`).

use std::cmp::Ordering;

use medledger_core::contracts::is_valid_record_id as is_fhir_id;
use serde_json::Value;

/// Why a search was refused. The caller answers 400 with an OperationOutcome. Messages name
/// the parameter and what is wrong; they do not repeat the values given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("{0} is not a resource type that can be searched")]
    UnsupportedType(String),
    #[error("{0} is not a search parameter of this resource type")]
    UnknownParameter(String),
    #[error("the modifier :{modifier} of {parameter} is not supported")]
    UnsupportedModifier { parameter: String, modifier: String },
    #[error("{parameter}: {detail}")]
    Unsupported { parameter: String, detail: String },
    #[error("{parameter} has an invalid value: {detail}")]
    InvalidValue { parameter: String, detail: String },
}

/// A parsed search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchParams {
    /// `_id`: the resource ids wanted (any of them); empty when not given.
    pub id: Vec<String>,
    /// `patient` or `subject`: the id of the patient the resources are about.
    pub patient: Option<String>,
    /// The other conditions, all of which must hold.
    pub filters: Vec<Filter>,
    /// `_count`: the page size, within the caller's bounds.
    pub count: usize,
    /// `_offset`: how many matching resources the page skips.
    pub offset: usize,
    /// `_sort`: the keys, most significant first; empty leaves the order to the caller.
    pub sort: Vec<SortKey>,
    /// `_include` of the patient resource.
    pub include_patient: bool,
    /// `_summary=count`: only the total is wanted.
    pub summary_count: bool,
}

/// One condition: the resource must match at least one of the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Code(Vec<Token>),
    Category(Vec<Token>),
    Status(Vec<Token>),
    Date(Vec<DateCriterion>),
    LastUpdated(Vec<DateCriterion>),
}

impl Filter {
    /// The query parameter the condition came from.
    pub fn parameter(&self) -> &'static str {
        match self {
            Filter::Code(_) => "code",
            Filter::Category(_) => "category",
            Filter::Status(_) => "status",
            Filter::Date(_) => "date",
            Filter::LastUpdated(_) => "_lastUpdated",
        }
    }
}

/// A token search value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `code`: the code in any system.
    Code(String),
    /// `|code`: the code in a coding that has no system.
    CodeWithoutSystem(String),
    /// `system|code`.
    SystemAndCode { system: String, code: String },
    /// `system|`: any code of the system.
    System(String),
}

/// A date search value with its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateCriterion {
    pub prefix: DatePrefix,
    pub value: DateRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatePrefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl DatePrefix {
    const ALL: [(&'static str, DatePrefix); 9] = [
        ("eq", DatePrefix::Eq),
        ("ne", DatePrefix::Ne),
        ("gt", DatePrefix::Gt),
        ("lt", DatePrefix::Lt),
        ("ge", DatePrefix::Ge),
        ("le", DatePrefix::Le),
        ("sa", DatePrefix::Sa),
        ("eb", DatePrefix::Eb),
        ("ap", DatePrefix::Ap),
    ];

    fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, prefix)| *prefix == self)
            .map_or("eq", |(text, _)| text)
    }
}

/// A FHIR date, dateTime or instant as the half-open range `[start_ms, end_ms)` of
/// milliseconds since 1970-01-01T00:00:00Z that its precision covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateRange {
    /// The value as written, so that links repeat it unchanged.
    pub text: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl DateRange {
    /// Parses a FHIR date (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`) or dateTime
    /// (`YYYY-MM-DDThh:mm[:ss[.fff…]]` with `Z`, `±hh:mm` or no zone, read as UTC).
    pub fn parse(text: &str) -> Option<DateRange> {
        let (start_ms, end_ms) = parse_date_range(text)?;
        Some(DateRange {
            text: text.to_owned(),
            start_ms,
            end_ms,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub field: SortField,
    pub descending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    Date,
    LastUpdated,
    Id,
    Status,
}

impl SortField {
    fn name(self) -> &'static str {
        match self {
            SortField::Date => "date",
            SortField::LastUpdated => "_lastUpdated",
            SortField::Id => "_id",
            SortField::Status => "status",
        }
    }
}

// ---- what each type can be searched on ---------------------------------------------------

/// A search parameter's elements in one type (top-level element names; the shape of each
/// value — CodeableConcept, Coding, code, dateTime, Period, or an array of them — is read
/// from the JSON) and its description for the CapabilityStatement.
struct Param {
    elements: &'static [&'static str],
    doc: &'static str,
}

struct TypeSearch {
    name: &'static str,
    /// The Reference element naming the patient.
    patient: &'static str,
    code: Option<Param>,
    category: Option<Param>,
    status: Option<&'static str>,
    date: Param,
}

const fn param(elements: &'static [&'static str], doc: &'static str) -> Param {
    Param { elements, doc }
}

/// The description of a token parameter: the element, then the forms a value may take.
macro_rules! token {
    ($element:literal) => {
        concat!($element, "; token: system|code, |code, code or system|")
    };
}

/// The same for an element of type code, which has no system to compare.
macro_rules! code_token {
    ($element:literal) => {
        concat!(
            $element,
            " (a code: the system of a token is not compared); token: system|code, |code, \
             code or system|"
        )
    };
}

const TYPES: [TypeSearch; 17] = [
    TypeSearch {
        name: "AllergyIntolerance",
        patient: "patient",
        code: Some(param(&["code"], token!("AllergyIntolerance.code"))),
        category: Some(param(
            &["category"],
            code_token!("AllergyIntolerance.category"),
        )),
        status: None,
        date: param(&["recordedDate"], "AllergyIntolerance.recordedDate"),
    },
    TypeSearch {
        name: "CarePlan",
        patient: "subject",
        code: Some(param(&["category"], token!("CarePlan.category"))),
        category: Some(param(&["category"], token!("CarePlan.category"))),
        status: Some(code_token!("CarePlan.status")),
        date: param(&["period"], "CarePlan.period"),
    },
    TypeSearch {
        name: "Condition",
        patient: "subject",
        code: Some(param(&["code"], token!("Condition.code"))),
        category: Some(param(&["category"], token!("Condition.category"))),
        status: None,
        date: param(
            &["recordedDate", "onsetDateTime"],
            "Condition.recordedDate or Condition.onsetDateTime",
        ),
    },
    TypeSearch {
        name: "Procedure",
        patient: "subject",
        code: Some(param(&["code"], token!("Procedure.code"))),
        category: Some(param(&["category"], token!("Procedure.category"))),
        status: Some(code_token!("Procedure.status")),
        date: param(
            &["performedDateTime", "performedPeriod"],
            "Procedure.performedDateTime or Procedure.performedPeriod",
        ),
    },
    TypeSearch {
        name: "DiagnosticReport",
        patient: "subject",
        code: Some(param(&["code"], token!("DiagnosticReport.code"))),
        category: Some(param(&["category"], token!("DiagnosticReport.category"))),
        status: Some(code_token!("DiagnosticReport.status")),
        date: param(
            &["effectiveDateTime", "effectivePeriod"],
            "DiagnosticReport.effectiveDateTime or DiagnosticReport.effectivePeriod",
        ),
    },
    TypeSearch {
        name: "ImagingStudy",
        patient: "subject",
        code: Some(param(
            &["procedureCode"],
            token!("ImagingStudy.procedureCode"),
        )),
        category: None,
        status: Some(code_token!("ImagingStudy.status")),
        date: param(&["started"], "ImagingStudy.started"),
    },
    TypeSearch {
        name: "Observation",
        patient: "subject",
        code: Some(param(&["code"], token!("Observation.code"))),
        category: Some(param(&["category"], token!("Observation.category"))),
        status: Some(code_token!("Observation.status")),
        date: param(
            &["effectiveDateTime", "effectivePeriod", "effectiveInstant"],
            "Observation.effectiveDateTime, effectivePeriod or effectiveInstant",
        ),
    },
    TypeSearch {
        name: "Specimen",
        patient: "subject",
        code: Some(param(&["type"], token!("Specimen.type"))),
        category: None,
        status: Some(code_token!("Specimen.status")),
        date: param(&["receivedTime"], "Specimen.receivedTime"),
    },
    TypeSearch {
        name: "Immunization",
        patient: "patient",
        code: Some(param(&["vaccineCode"], token!("Immunization.vaccineCode"))),
        category: None,
        status: Some(code_token!("Immunization.status")),
        date: param(&["occurrenceDateTime"], "Immunization.occurrenceDateTime"),
    },
    TypeSearch {
        name: "MedicationRequest",
        patient: "subject",
        code: Some(param(
            &["medicationCodeableConcept"],
            token!("MedicationRequest.medicationCodeableConcept"),
        )),
        category: Some(param(&["category"], token!("MedicationRequest.category"))),
        status: Some(code_token!("MedicationRequest.status")),
        date: param(&["authoredOn"], "MedicationRequest.authoredOn"),
    },
    TypeSearch {
        name: "MedicationStatement",
        patient: "subject",
        code: Some(param(
            &["medicationCodeableConcept"],
            token!("MedicationStatement.medicationCodeableConcept"),
        )),
        category: None,
        status: Some(code_token!("MedicationStatement.status")),
        date: param(
            &["effectiveDateTime", "effectivePeriod"],
            "MedicationStatement.effectiveDateTime or MedicationStatement.effectivePeriod",
        ),
    },
    TypeSearch {
        name: "Composition",
        patient: "subject",
        code: Some(param(&["type"], token!("Composition.type"))),
        category: Some(param(&["category"], token!("Composition.category"))),
        status: Some(code_token!("Composition.status")),
        date: param(&["date"], "Composition.date"),
    },
    TypeSearch {
        name: "DocumentReference",
        patient: "subject",
        code: Some(param(&["type"], token!("DocumentReference.type"))),
        category: Some(param(&["category"], token!("DocumentReference.category"))),
        status: Some(code_token!("DocumentReference.status")),
        date: param(&["date"], "DocumentReference.date"),
    },
    TypeSearch {
        name: "Encounter",
        patient: "subject",
        code: Some(param(&["type"], token!("Encounter.type"))),
        category: Some(param(&["class"], token!("Encounter.class (a Coding)"))),
        status: Some(code_token!("Encounter.status")),
        date: param(&["period"], "Encounter.period"),
    },
    TypeSearch {
        name: "Claim",
        patient: "patient",
        code: None,
        category: None,
        status: Some(code_token!("Claim.status")),
        date: param(&["created"], "Claim.created"),
    },
    TypeSearch {
        name: "Coverage",
        patient: "beneficiary",
        code: Some(param(&["type"], token!("Coverage.type"))),
        category: None,
        status: Some(code_token!("Coverage.status")),
        date: param(&["period"], "Coverage.period"),
    },
    // A Patient is its own patient: `patient=` compares its id. Its date is the birth date.
    TypeSearch {
        name: "Patient",
        patient: "id",
        code: None,
        category: None,
        status: None,
        date: param(&["birthDate"], "Patient.birthDate"),
    },
];

fn type_search(resource_type: &str) -> Option<&'static TypeSearch> {
    TYPES.iter().find(|spec| spec.name == resource_type)
}

const PATIENT_DOC: &str = "The patient the resource is about: Patient/<id>, <id> or an \
                           absolute URL ending in /Patient/<id>";

/// The search parameters `resource_type` supports, as (name, R4 search parameter type,
/// description), for the CapabilityStatement. Only parameters that select resources are
/// listed; the result parameters (`_count`, `_offset`, `_sort`, `_include`, `_summary`) are
/// the same for every type. An unknown type has none.
pub fn search_parameters(resource_type: &str) -> Vec<(&'static str, &'static str, &'static str)> {
    let Some(spec) = type_search(resource_type) else {
        return Vec::new();
    };
    let mut out = vec![
        (
            "_id",
            "token",
            "The resource id; several ids separated by commas",
        ),
        (
            "_lastUpdated",
            "date",
            "When the resource was last changed (meta.lastUpdated)",
        ),
        ("patient", "reference", PATIENT_DOC),
        ("subject", "reference", PATIENT_DOC),
    ];
    if let Some(code) = &spec.code {
        out.push(("code", "token", code.doc));
    }
    if let Some(category) = &spec.category {
        out.push(("category", "token", category.doc));
    }
    if let Some(status) = spec.status {
        out.push(("status", "token", status));
    }
    out.push(("date", "date", spec.date.doc));
    out
}

// ---- parsing ---------------------------------------------------------------------------

/// Parses a search on `resource_type` from its decoded query pairs. `_count` defaults to
/// `default_count` and is clamped to `max_count`.
pub fn parse(
    resource_type: &str,
    query: &[(String, String)],
    default_count: usize,
    max_count: usize,
) -> Result<SearchParams, SearchError> {
    let spec = type_search(resource_type)
        .ok_or_else(|| SearchError::UnsupportedType(resource_type.to_owned()))?;
    let mut params = SearchParams {
        id: Vec::new(),
        patient: None,
        filters: Vec::new(),
        count: default_count.min(max_count),
        offset: 0,
        sort: Vec::new(),
        include_patient: false,
        summary_count: false,
    };
    let mut seen_id = false;
    let mut seen_count = false;
    let mut seen_offset = false;
    let mut seen_sort = false;
    let mut seen_summary = false;

    for (raw_name, value) in query {
        let (name, modifier) = match raw_name.split_once(':') {
            Some((name, modifier)) => (name, Some(modifier)),
            None => (raw_name.as_str(), None),
        };
        if !is_known(spec, name) {
            return Err(SearchError::UnknownParameter(name.to_owned()));
        }
        if let Some(modifier) = modifier {
            return Err(SearchError::UnsupportedModifier {
                parameter: name.to_owned(),
                modifier: modifier.to_owned(),
            });
        }
        match name {
            // Output formatting is the caller's concern and changes no result.
            "_format" | "_pretty" => {}
            "_elements" => {
                return Err(unsupported(
                    name,
                    "only whole resources are returned".to_owned(),
                ))
            }
            "_revinclude" => {
                return Err(unsupported(
                    name,
                    "resources that refer to the matches are not included".to_owned(),
                ))
            }
            "_id" => {
                once(&mut seen_id, name)?;
                params.id = parse_ids(name, value)?;
            }
            "patient" | "subject" => {
                let id = parse_patient(name, value)?;
                match &params.patient {
                    Some(existing) if *existing != id => {
                        return Err(invalid(
                            name,
                            "patient and subject name more than one patient",
                        ))
                    }
                    _ => params.patient = Some(id),
                }
            }
            "code" => params
                .filters
                .push(Filter::Code(parse_tokens(name, value)?)),
            "category" => params
                .filters
                .push(Filter::Category(parse_tokens(name, value)?)),
            "status" => params
                .filters
                .push(Filter::Status(parse_tokens(name, value)?)),
            "date" => params.filters.push(Filter::Date(parse_dates(name, value)?)),
            "_lastUpdated" => params
                .filters
                .push(Filter::LastUpdated(parse_dates(name, value)?)),
            "_count" => {
                once(&mut seen_count, name)?;
                params.count = parse_count(name, value, max_count)?;
            }
            "_offset" => {
                once(&mut seen_offset, name)?;
                params.offset = parse_offset(name, value)?;
            }
            "_sort" => {
                once(&mut seen_sort, name)?;
                params.sort = parse_sort(spec, name, value)?;
            }
            "_include" => {
                parse_include(spec, name, value)?;
                params.include_patient = true;
            }
            "_summary" => {
                once(&mut seen_summary, name)?;
                if value != "count" {
                    return Err(unsupported(
                        name,
                        "only _summary=count is supported".to_owned(),
                    ));
                }
                params.summary_count = true;
            }
            // `is_known` admits only the names above.
            _ => return Err(SearchError::UnknownParameter(name.to_owned())),
        }
    }
    Ok(params)
}

fn is_known(spec: &TypeSearch, name: &str) -> bool {
    match name {
        "_format" | "_pretty" | "_elements" | "_revinclude" | "_id" | "patient" | "subject"
        | "date" | "_lastUpdated" | "_count" | "_offset" | "_sort" | "_include" | "_summary" => {
            true
        }
        "code" => spec.code.is_some(),
        "category" => spec.category.is_some(),
        "status" => spec.status.is_some(),
        _ => false,
    }
}

fn invalid(parameter: &str, detail: &str) -> SearchError {
    SearchError::InvalidValue {
        parameter: parameter.to_owned(),
        detail: detail.to_owned(),
    }
}

fn unsupported(parameter: &str, detail: String) -> SearchError {
    SearchError::Unsupported {
        parameter: parameter.to_owned(),
        detail,
    }
}

/// Refuses a second occurrence of a parameter whose repetition has no meaning here.
fn once(seen: &mut bool, name: &str) -> Result<(), SearchError> {
    if std::mem::replace(seen, true) {
        return Err(invalid(name, "may be given only once"));
    }
    Ok(())
}

fn parse_ids(name: &str, value: &str) -> Result<Vec<String>, SearchError> {
    let mut ids: Vec<String> = Vec::new();
    for id in value.split(',') {
        if !is_fhir_id(id) {
            return Err(invalid(
                name,
                "each id is 1 to 64 of A-Z, a-z, 0-9, '-', '.'",
            ));
        }
        if !ids.iter().any(|known| known == id) {
            ids.push(id.to_owned());
        }
    }
    Ok(ids)
}

/// The patient id from `Patient/<id>`, `<id>` or `http(s)://…/Patient/<id>`.
fn parse_patient(name: &str, value: &str) -> Result<String, SearchError> {
    let absolute = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    let id = if let Some(id) = value.strip_prefix("Patient/") {
        id
    } else if let Some(rest) = absolute {
        // The server's base comes first, so something must stand before /Patient/.
        match rest.rsplit_once("/Patient/") {
            Some((base, id)) if !base.is_empty() => id,
            _ => "",
        }
    } else {
        value
    };
    if !is_fhir_id(id) {
        return Err(invalid(
            name,
            "one patient is expected: Patient/<id>, <id> or an absolute URL ending in \
             /Patient/<id>",
        ));
    }
    Ok(id.to_owned())
}

/// Splits on separators not preceded by a backslash; escapes stay in the pieces.
fn split_unescaped(value: &str, separator: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (index, c) in value.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == separator {
            pieces.push(&value[start..index]);
            start = index + c.len_utf8();
        }
    }
    pieces.push(&value[start..]);
    pieces
}

fn unescape(name: &str, text: &str) -> Result<String, SearchError> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next @ ('\\' | ',' | '|' | '$')) => out.push(next),
                _ => return Err(invalid(name, "a backslash escapes only \\ , | or $")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | ',' | '|' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn parse_tokens(name: &str, value: &str) -> Result<Vec<Token>, SearchError> {
    split_unescaped(value, ',')
        .into_iter()
        .map(|piece| parse_token(name, piece))
        .collect()
}

fn parse_token(name: &str, piece: &str) -> Result<Token, SearchError> {
    let parts = split_unescaped(piece, '|');
    let token = match parts.as_slice() {
        [code] => Token::Code(unescape(name, code)?),
        [system, code] => {
            let system = unescape(name, system)?;
            let code = unescape(name, code)?;
            match (system.is_empty(), code.is_empty()) {
                (true, true) => return Err(invalid(name, "a token needs a system or a code")),
                (true, false) => Token::CodeWithoutSystem(code),
                (false, true) => Token::System(system),
                (false, false) => Token::SystemAndCode { system, code },
            }
        }
        _ => return Err(invalid(name, "a token has at most one unescaped |")),
    };
    if matches!(&token, Token::Code(code) if code.is_empty()) {
        return Err(invalid(name, "a value is empty"));
    }
    Ok(token)
}

fn format_token(token: &Token) -> String {
    match token {
        Token::Code(code) => escape(code),
        Token::CodeWithoutSystem(code) => format!("|{}", escape(code)),
        Token::SystemAndCode { system, code } => format!("{}|{}", escape(system), escape(code)),
        Token::System(system) => format!("{}|", escape(system)),
    }
}

fn parse_dates(name: &str, value: &str) -> Result<Vec<DateCriterion>, SearchError> {
    value
        .split(',')
        .map(|piece| {
            let (prefix, text) = DatePrefix::ALL
                .iter()
                .find_map(|(text, prefix)| piece.strip_prefix(text).map(|rest| (*prefix, rest)))
                .unwrap_or((DatePrefix::Eq, piece));
            let value = DateRange::parse(text).ok_or_else(|| {
                invalid(
                    name,
                    "a date is YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]] with \
                     an optional Z or ±hh:mm, after an optional prefix (eq, ne, gt, lt, ge, \
                     le, sa, eb, ap)",
                )
            })?;
            Ok(DateCriterion { prefix, value })
        })
        .collect()
}

fn parse_count(name: &str, value: &str, max_count: usize) -> Result<usize, SearchError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(name, "a non-negative integer is expected"));
    }
    // Digits only, so a failed parse is an overflow: more than any page holds.
    Ok(value.parse::<usize>().unwrap_or(usize::MAX).min(max_count))
}

fn parse_offset(name: &str, value: &str) -> Result<usize, SearchError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(name, "a non-negative integer is expected"));
    }
    value
        .parse::<usize>()
        .map_err(|_| invalid(name, "the offset is too large"))
}

fn parse_sort(spec: &TypeSearch, name: &str, value: &str) -> Result<Vec<SortKey>, SearchError> {
    value
        .split(',')
        .map(|piece| {
            let (descending, key) = match piece.strip_prefix('-') {
                Some(key) => (true, key),
                None => (false, piece),
            };
            let field = match key {
                "date" => SortField::Date,
                "_lastUpdated" => SortField::LastUpdated,
                "_id" => SortField::Id,
                "status" if spec.status.is_some() => SortField::Status,
                "" => return Err(invalid(name, "a sort key is empty")),
                _ => {
                    return Err(unsupported(
                        name,
                        format!(
                            "cannot sort on {key}; the keys are date, _lastUpdated, _id{}",
                            if spec.status.is_some() {
                                " and status"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
            };
            Ok(SortKey { field, descending })
        })
        .collect()
}

/// Accepts `*` and `<Type>:patient` or `<Type>:subject` (with `*` or this type as the
/// source and optionally `:Patient` as the target): every form names the patient.
fn parse_include(spec: &TypeSearch, name: &str, value: &str) -> Result<(), SearchError> {
    if value == "*" {
        return Ok(());
    }
    let parts: Vec<&str> = value.split(':').collect();
    let names_patient = match parts.as_slice() {
        [source, element] | [source, element, "Patient"] => {
            (*source == spec.name || *source == "*")
                && (*element == "patient" || *element == "subject")
        }
        _ => false,
    };
    if !names_patient {
        return Err(unsupported(
            name,
            format!("only the patient can be included: {}:patient", spec.name),
        ));
    }
    Ok(())
}

/// The canonical query of a search (without `_offset`), for the bundle's links: parsing it
/// again for the same type gives the same search at offset 0.
pub fn self_query(resource_type: &str, params: &SearchParams) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if !params.id.is_empty() {
        out.push(("_id".to_owned(), params.id.join(",")));
    }
    if let Some(patient) = &params.patient {
        out.push(("patient".to_owned(), patient.clone()));
    }
    for filter in &params.filters {
        let value = match filter {
            Filter::Code(tokens) | Filter::Category(tokens) | Filter::Status(tokens) => tokens
                .iter()
                .map(format_token)
                .collect::<Vec<_>>()
                .join(","),
            Filter::Date(dates) | Filter::LastUpdated(dates) => dates
                .iter()
                .map(|date| format!("{}{}", date.prefix.as_str(), date.value.text))
                .collect::<Vec<_>>()
                .join(","),
        };
        out.push((filter.parameter().to_owned(), value));
    }
    if !params.sort.is_empty() {
        let keys: Vec<String> = params
            .sort
            .iter()
            .map(|key| {
                let sign = if key.descending { "-" } else { "" };
                format!("{sign}{}", key.field.name())
            })
            .collect();
        out.push(("_sort".to_owned(), keys.join(",")));
    }
    out.push(("_count".to_owned(), params.count.to_string()));
    if params.include_patient {
        out.push(("_include".to_owned(), format!("{resource_type}:patient")));
    }
    if params.summary_count {
        out.push(("_summary".to_owned(), "count".to_owned()));
    }
    out
}

// ---- matching --------------------------------------------------------------------------

/// True when `resource` (of `resource_type`) satisfies every condition of the search. A
/// type this module does not know matches nothing.
pub fn matches(resource_type: &str, params: &SearchParams, resource: &Value) -> bool {
    let Some(spec) = type_search(resource_type) else {
        return false;
    };
    if let Some(found) = resource.get("resourceType") {
        if found != resource_type {
            return false;
        }
    }
    if !params.id.is_empty() {
        let id = resource.get("id").and_then(Value::as_str);
        if !id.is_some_and(|id| params.id.iter().any(|wanted| wanted == id)) {
            return false;
        }
    }
    if let Some(patient) = &params.patient {
        let found = match spec.patient {
            "id" => resource.get("id").and_then(Value::as_str),
            element => resource
                .get(element)
                .and_then(|reference| reference.get("reference"))
                .and_then(Value::as_str)
                .and_then(|reference| reference.strip_prefix("Patient/")),
        };
        if found != Some(patient.as_str()) {
            return false;
        }
    }
    params
        .filters
        .iter()
        .all(|filter| filter_matches(spec, filter, resource))
}

fn filter_matches(spec: &TypeSearch, filter: &Filter, resource: &Value) -> bool {
    match filter {
        Filter::Code(tokens) => spec
            .code
            .as_ref()
            .is_some_and(|code| tokens_match(code.elements, tokens, resource)),
        Filter::Category(tokens) => spec
            .category
            .as_ref()
            .is_some_and(|category| tokens_match(category.elements, tokens, resource)),
        Filter::Status(tokens) => {
            spec.status.is_some() && tokens_match(&["status"], tokens, resource)
        }
        Filter::Date(dates) => {
            let ranges = date_ranges(spec, resource);
            dates_match(dates, &ranges)
        }
        Filter::LastUpdated(dates) => {
            let ranges: Vec<(i64, i64)> = last_updated(resource).into_iter().collect();
            dates_match(dates, &ranges)
        }
    }
}

fn tokens_match(elements: &[&str], tokens: &[Token], resource: &Value) -> bool {
    elements.iter().any(|element| {
        resource
            .get(element)
            .is_some_and(|value| tokens.iter().any(|token| token_matches(token, value)))
    })
}

/// Matches a token against a code (string), a Coding, a CodeableConcept (any of its
/// codings) or an array of any of these.
fn token_matches(token: &Token, value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().any(|item| token_matches(token, item)),
        // A code: its system is implied by the element, so only the code is compared.
        Value::String(code) => match token {
            Token::Code(wanted)
            | Token::CodeWithoutSystem(wanted)
            | Token::SystemAndCode { code: wanted, .. } => code == wanted,
            Token::System(_) => true,
        },
        Value::Object(object) => match object.get("coding") {
            Some(Value::Array(codings)) => {
                codings.iter().any(|coding| coding_matches(token, coding))
            }
            Some(_) => false,
            None => coding_matches(token, value),
        },
        _ => false,
    }
}

fn coding_matches(token: &Token, coding: &Value) -> bool {
    let system = coding.get("system").and_then(Value::as_str);
    let code = coding.get("code").and_then(Value::as_str);
    match token {
        Token::Code(wanted) => code == Some(wanted.as_str()),
        Token::CodeWithoutSystem(wanted) => {
            coding.get("system").is_none() && code == Some(wanted.as_str())
        }
        Token::SystemAndCode {
            system: wanted_system,
            code: wanted_code,
        } => system == Some(wanted_system.as_str()) && code == Some(wanted_code.as_str()),
        Token::System(wanted) => system == Some(wanted.as_str()),
    }
}

/// The ranges of the type's date elements in `resource`; values that do not parse are
/// left out.
fn date_ranges(spec: &TypeSearch, resource: &Value) -> Vec<(i64, i64)> {
    spec.date
        .elements
        .iter()
        .filter_map(|element| resource.get(element))
        .filter_map(value_range)
        .collect()
}

fn last_updated(resource: &Value) -> Option<(i64, i64)> {
    resource
        .get("meta")
        .and_then(|meta| meta.get("lastUpdated"))
        .and_then(Value::as_str)
        .and_then(parse_date_range)
}

/// A dateTime string or a Period as a range; a Period without start or end is open on that
/// side.
fn value_range(value: &Value) -> Option<(i64, i64)> {
    match value {
        Value::String(text) => parse_date_range(text),
        Value::Object(period) => {
            let start = period.get("start");
            let end = period.get("end");
            if start.is_none() && end.is_none() {
                return None;
            }
            let start = match start {
                Some(start) => parse_date_range(start.as_str()?)?.0,
                None => i64::MIN,
            };
            let end = match end {
                Some(end) => parse_date_range(end.as_str()?)?.1,
                None => i64::MAX,
            };
            // A period that ends before it starts is not a range; it matches nothing.
            (start < end).then_some((start, end))
        }
        _ => None,
    }
}

fn dates_match(criteria: &[DateCriterion], targets: &[(i64, i64)]) -> bool {
    targets.iter().any(|&target| {
        criteria
            .iter()
            .any(|criterion| date_matches(criterion, target))
    })
}

const DAY_MS: i64 = 86_400_000;

/// R4 search's comparison of a search range with a target range (both half-open).
fn date_matches(criterion: &DateCriterion, (target_start, target_end): (i64, i64)) -> bool {
    let start = criterion.value.start_ms;
    let end = criterion.value.end_ms;
    let contained = start <= target_start && target_end <= end;
    // The target reaches into [end, +inf) or (-inf, start).
    let above = target_end > end;
    let below = target_start < start;
    match criterion.prefix {
        DatePrefix::Eq => contained,
        DatePrefix::Ne => !contained,
        DatePrefix::Gt => above,
        DatePrefix::Lt => below,
        DatePrefix::Ge => above || contained,
        DatePrefix::Le => below || contained,
        DatePrefix::Sa => target_start >= end,
        DatePrefix::Eb => target_end <= start,
        DatePrefix::Ap => {
            target_start < end.saturating_add(DAY_MS) && target_end > start.saturating_sub(DAY_MS)
        }
    }
}

// ---- sorting ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SortValue {
    Time(i64),
    Text(String),
}

/// Orders `resources` by `keys`, most significant first. The sort is stable, and a resource
/// without a value for a key comes after those with one, whatever the direction. With a
/// multi-valued date, ascending order uses the earliest start and descending the latest
/// end, as R4 asks.
pub fn sort(resource_type: &str, keys: &[SortKey], resources: &mut [Value]) {
    if keys.is_empty() || resources.len() < 2 {
        return;
    }
    let spec = type_search(resource_type);
    let values: Vec<Vec<Option<SortValue>>> = resources
        .iter()
        .map(|resource| {
            keys.iter()
                .map(|key| sort_value(spec, *key, resource))
                .collect()
        })
        .collect();
    let mut order: Vec<usize> = (0..resources.len()).collect();
    order.sort_by(|&a, &b| {
        keys.iter()
            .zip(values[a].iter().zip(&values[b]))
            .map(|(key, (a, b))| compare(key.descending, a.as_ref(), b.as_ref()))
            .find(|ordering| ordering.is_ne())
            .unwrap_or(Ordering::Equal)
    });
    let mut taken: Vec<Value> = resources.iter_mut().map(std::mem::take).collect();
    for (slot, index) in resources.iter_mut().zip(order) {
        *slot = std::mem::take(&mut taken[index]);
    }
}

fn compare(descending: bool, a: Option<&SortValue>, b: Option<&SortValue>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) if descending => b.cmp(a),
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

fn sort_value(spec: Option<&TypeSearch>, key: SortKey, resource: &Value) -> Option<SortValue> {
    let text = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .map(|s| SortValue::Text(s.to_owned()))
    };
    match key.field {
        SortField::Date => {
            let ranges = date_ranges(spec?, resource);
            let time = if key.descending {
                ranges.iter().map(|range| range.1).max()
            } else {
                ranges.iter().map(|range| range.0).min()
            };
            time.map(SortValue::Time)
        }
        SortField::LastUpdated => last_updated(resource).map(|range| SortValue::Time(range.0)),
        SortField::Id => text(resource.get("id")),
        SortField::Status => text(resource.get("status")),
    }
}

// ---- dates -----------------------------------------------------------------------------

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the first of `month` (1-12) of `year` (1-9999, or 10000 for the
/// end of 9999), in the proleptic Gregorian calendar.
fn days_to_month(year: i64, month: i64) -> i64 {
    let before = year - 1;
    let days_to_year = 365 * before + before / 4 - before / 100 + before / 400;
    // 1969 years of days from 0001-01-01 to 1970-01-01.
    const EPOCH: i64 = 365 * 1969 + 1969 / 4 - 1969 / 100 + 1969 / 400;
    let days_in_year: i64 = (1..month).map(|m| days_in_month(year, m)).sum();
    days_to_year - EPOCH + days_in_year
}

/// Reads exactly `len` ASCII digits at `at`.
fn digits(bytes: &[u8], at: usize, len: usize) -> Option<i64> {
    let slice = bytes.get(at..at + len)?;
    slice.iter().try_fold(0i64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
    })
}

/// A FHIR date or dateTime as `[start, end)` in milliseconds UTC; None if it is not one.
fn parse_date_range(text: &str) -> Option<(i64, i64)> {
    let b = text.as_bytes();
    let year = digits(b, 0, 4)?;
    if year == 0 {
        return None;
    }
    let year_start = days_to_month(year, 1) * DAY_MS;
    if b.len() == 4 {
        return Some((year_start, days_to_month(year + 1, 1) * DAY_MS));
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = digits(b, 5, 2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    let month_start = days_to_month(year, month) * DAY_MS;
    if b.len() == 7 {
        let next = if month == 12 {
            days_to_month(year + 1, 1)
        } else {
            days_to_month(year, month + 1)
        };
        return Some((month_start, next * DAY_MS));
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = digits(b, 8, 2)?;
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let day_start = month_start + (day - 1) * DAY_MS;
    if b.len() == 10 {
        return Some((day_start, day_start + DAY_MS));
    }
    if b.get(10) != Some(&b'T') {
        return None;
    }
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    if b.get(13) != Some(&b':') || hour > 23 || minute > 59 {
        return None;
    }
    let mut at = 16;
    let mut millis = hour * 3_600_000 + minute * 60_000;
    // Without seconds the value covers the whole minute.
    let mut precision = 60_000;
    if b.get(at) == Some(&b':') {
        let second = digits(b, at + 1, 2)?;
        // 60 is a leap second, which R4 allows; it runs on into the next minute.
        if second > 60 {
            return None;
        }
        millis += second * 1000;
        precision = 1000;
        at += 3;
        if b.get(at) == Some(&b'.') {
            at += 1;
            let fraction_start = at;
            while b.get(at).is_some_and(u8::is_ascii_digit) {
                at += 1;
            }
            let fraction = &b[fraction_start..at];
            if fraction.is_empty() {
                return None;
            }
            // Finer than a millisecond is kept to the millisecond.
            let kept = &fraction[..fraction.len().min(3)];
            let mut value = kept.iter().fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
            for _ in kept.len()..3 {
                value *= 10;
            }
            millis += value;
            precision = match fraction.len() {
                1 => 100,
                2 => 10,
                _ => 1,
            };
        }
    }
    let offset = match b.get(at) {
        None => 0,
        Some(b'Z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == b.len() => {
            let hours = digits(b, at + 1, 2)?;
            let minutes = digits(b, at + 4, 2)?;
            if b[at + 3] != b':' || hours > 14 || minutes > 59 {
                return None;
            }
            let offset = hours * 3_600_000 + minutes * 60_000;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    let start = day_start + millis - offset;
    Some((start, start + precision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX: usize = 100;

    fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn search(resource_type: &str, pairs: &[(&str, &str)]) -> SearchParams {
        parse(resource_type, &query(pairs), 20, MAX).expect("the search parses")
    }

    fn error(resource_type: &str, pairs: &[(&str, &str)]) -> SearchError {
        parse(resource_type, &query(pairs), 20, MAX).expect_err("the search is refused")
    }

    fn hit(resource_type: &str, pairs: &[(&str, &str)], resource: &Value) -> bool {
        matches(resource_type, &search(resource_type, pairs), resource)
    }

    fn concept(system: Option<&str>, code: &str) -> Value {
        match system {
            Some(system) => json!({ "coding": [{ "system": system, "code": code }] }),
            None => json!({ "coding": [{ "code": code }] }),
        }
    }

    const LOINC: &str = "http://loinc.org";
    const SNOMED: &str = "http://snomed.info/sct";

    fn observation(effective: Value) -> Value {
        let mut resource = json!({
            "resourceType": "Observation",
            "id": "obs-1",
            "status": "final",
            "code": {
                "coding": [
                    { "system": LOINC, "code": "8867-4" },
                    { "code": "hr" }
                ]
            },
            "category": [concept(Some("http://terminology.hl7.org/CodeSystem/observation-category"), "vital-signs")],
            "subject": { "reference": "Patient/p1" },
            "meta": { "lastUpdated": "2024-05-01T12:00:00.000Z" }
        });
        if let (Value::Object(object), Value::Object(extra)) = (&mut resource, effective) {
            object.extend(extra);
        }
        resource
    }

    fn observation_at(date_time: &str) -> Value {
        observation(json!({ "effectiveDateTime": date_time }))
    }

    fn date_hit(criterion: &str, target: &Value) -> bool {
        hit("Observation", &[("date", criterion)], target)
    }

    fn ids(resources: &[Value]) -> Vec<&str> {
        resources
            .iter()
            .map(|r| r["id"].as_str().unwrap_or("-"))
            .collect()
    }

    // The four token forms match a CodeableConcept's codings on Observation and Condition.
    #[test]
    fn token_forms_match_codeable_concepts() {
        let obs = observation(json!({}));
        for (value, expected) in [
            ("http://loinc.org|8867-4", true),
            ("http://snomed.info/sct|8867-4", false),
            ("8867-4", true),
            ("|hr", true),
            ("|8867-4", false),
            ("http://loinc.org|", true),
            ("http://snomed.info/sct|", false),
            ("hr", true),
            ("8867", false),
        ] {
            assert_eq!(
                hit("Observation", &[("code", value)], &obs),
                expected,
                "{value}"
            );
        }
        let condition = json!({
            "resourceType": "Condition",
            "subject": { "reference": "Patient/p1" },
            "code": concept(Some(SNOMED), "44054006")
        });
        assert!(hit(
            "Condition",
            &[("code", "http://snomed.info/sct|44054006")],
            &condition
        ));
        assert!(hit("Condition", &[("code", "44054006")], &condition));
        assert!(!hit("Condition", &[("code", "|44054006")], &condition));
        assert!(hit(
            "Condition",
            &[("code", "http://snomed.info/sct|")],
            &condition
        ));
        // A concept with text only has no code to match.
        let text_only = json!({ "resourceType": "Condition", "code": { "text": "diabetes" } });
        assert!(!hit("Condition", &[("code", "diabetes")], &text_only));
    }

    // `code` reads each type's own element, including lists of concepts and medications.
    #[test]
    fn code_reads_the_element_of_each_type() {
        let care_plan = json!({
            "resourceType": "CarePlan",
            "category": [concept(None, "a"), concept(Some(SNOMED), "734163000")]
        });
        assert!(hit("CarePlan", &[("code", "734163000")], &care_plan));
        let encounter =
            json!({ "resourceType": "Encounter", "type": [concept(Some(SNOMED), "185349003")] });
        assert!(hit(
            "Encounter",
            &[("code", "http://snomed.info/sct|185349003")],
            &encounter
        ));
        let imaging =
            json!({ "resourceType": "ImagingStudy", "procedureCode": [concept(None, "ct")] });
        assert!(hit("ImagingStudy", &[("code", "|ct")], &imaging));
        let request = json!({
            "resourceType": "MedicationRequest",
            "medicationCodeableConcept": concept(Some("http://www.nlm.nih.gov/research/umls/rxnorm"), "1049502")
        });
        assert!(hit("MedicationRequest", &[("code", "1049502")], &request));
        let by_reference = json!({
            "resourceType": "MedicationRequest",
            "medicationReference": { "reference": "Medication/1049502" }
        });
        assert!(!hit(
            "MedicationRequest",
            &[("code", "1049502")],
            &by_reference
        ));
        let immunization = json!({ "resourceType": "Immunization", "vaccineCode": concept(Some("http://hl7.org/fhir/sid/cvx"), "140") });
        assert!(hit(
            "Immunization",
            &[("code", "http://hl7.org/fhir/sid/cvx|140")],
            &immunization
        ));
        let document =
            json!({ "resourceType": "DocumentReference", "type": concept(Some(LOINC), "34133-9") });
        assert!(hit("DocumentReference", &[("code", "34133-9")], &document));
        assert!(!hit("DocumentReference", &[("code", "11488-4")], &document));
        let coverage = json!({ "resourceType": "Coverage", "type": concept(None, "EHCPOL") });
        assert!(hit("Coverage", &[("code", "EHCPOL")], &coverage));
        let specimen = json!({ "resourceType": "Specimen", "type": concept(None, "BLD") });
        assert!(hit("Specimen", &[("code", "BLD")], &specimen));
    }

    // `code` is unknown for Claim, and `category` for types without one.
    #[test]
    fn parameters_a_type_lacks_are_unknown() {
        assert_eq!(
            error("Claim", &[("code", "x")]),
            SearchError::UnknownParameter("code".to_owned())
        );
        for resource_type in [
            "Specimen",
            "Immunization",
            "Claim",
            "Coverage",
            "ImagingStudy",
        ] {
            assert_eq!(
                error(resource_type, &[("category", "x")]),
                SearchError::UnknownParameter("category".to_owned()),
                "{resource_type}"
            );
        }
        for resource_type in ["Condition", "AllergyIntolerance"] {
            assert_eq!(
                error(resource_type, &[("status", "active")]),
                SearchError::UnknownParameter("status".to_owned())
            );
        }
        assert_eq!(
            error("Practitioner", &[]),
            SearchError::UnsupportedType("Practitioner".to_owned())
        );
    }

    // `category` matches concepts, lists of concepts, code lists and Encounter's class Coding.
    #[test]
    fn category_matches_each_shape() {
        let obs = observation(json!({}));
        assert!(hit("Observation", &[("category", "vital-signs")], &obs));
        assert!(!hit("Observation", &[("category", "laboratory")], &obs));
        let procedure =
            json!({ "resourceType": "Procedure", "category": concept(Some(SNOMED), "387713003") });
        assert!(hit(
            "Procedure",
            &[("category", "http://snomed.info/sct|387713003")],
            &procedure
        ));
        assert!(!hit("Procedure", &[("category", "|387713003")], &procedure));
        let allergy =
            json!({ "resourceType": "AllergyIntolerance", "category": ["food", "medication"] });
        assert!(hit(
            "AllergyIntolerance",
            &[("category", "medication")],
            &allergy
        ));
        assert!(hit(
            "AllergyIntolerance",
            &[(
                "category",
                "http://hl7.org/fhir/allergy-intolerance-category|food"
            )],
            &allergy
        ));
        assert!(!hit(
            "AllergyIntolerance",
            &[("category", "biologic")],
            &allergy
        ));
        let encounter = json!({
            "resourceType": "Encounter",
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" }
        });
        assert!(hit("Encounter", &[("category", "AMB")], &encounter));
        assert!(hit(
            "Encounter",
            &[(
                "category",
                "http://terminology.hl7.org/CodeSystem/v3-ActCode|AMB"
            )],
            &encounter
        ));
        assert!(!hit("Encounter", &[("category", "|AMB")], &encounter));
        assert!(!hit("Encounter", &[("category", "IMP")], &encounter));
    }

    // `status` compares the status code on several types.
    #[test]
    fn status_compares_the_code() {
        let obs = observation(json!({}));
        assert!(hit("Observation", &[("status", "final")], &obs));
        assert!(!hit("Observation", &[("status", "preliminary")], &obs));
        assert!(hit("Observation", &[("status", "|final")], &obs));
        let claim = json!({ "resourceType": "Claim", "status": "active" });
        assert!(hit("Claim", &[("status", "active")], &claim));
        assert!(!hit("Claim", &[("status", "cancelled")], &claim));
        let no_status = json!({ "resourceType": "Specimen" });
        assert!(!hit("Specimen", &[("status", "available")], &no_status));
    }

    // Commas give alternatives; a repeated parameter adds a condition.
    #[test]
    fn commas_are_or_and_repetition_is_and() {
        let obs = observation(json!({}));
        assert!(hit("Observation", &[("code", "nope,8867-4")], &obs));
        assert!(!hit("Observation", &[("code", "nope,other")], &obs));
        assert!(hit(
            "Observation",
            &[("code", "8867-4"), ("code", "hr")],
            &obs
        ));
        assert!(!hit(
            "Observation",
            &[("code", "8867-4"), ("code", "nope")],
            &obs
        ));
        assert!(hit(
            "Observation",
            &[("status", "amended,final"), ("category", "vital-signs")],
            &obs
        ));
        let at = observation_at("2024-03-10");
        assert!(date_hit("2023,2024", &at));
        assert!(hit(
            "Observation",
            &[("date", "ge2024-03"), ("date", "lt2024-04")],
            &at
        ));
        assert!(!hit(
            "Observation",
            &[("date", "ge2024-03"), ("date", "lt2024-03-10")],
            &at
        ));
        assert!(hit("Observation", &[("_id", "x,obs-1")], &obs));
        assert!(!hit("Observation", &[("_id", "x,y")], &obs));
    }

    // `_id` selects by id on two types, and may not be repeated or malformed.
    #[test]
    fn id_selects_by_resource_id() {
        let claim = json!({ "resourceType": "Claim", "id": "c-9" });
        assert!(hit("Claim", &[("_id", "c-9")], &claim));
        assert!(!hit("Claim", &[("_id", "c-1")], &claim));
        assert!(!hit(
            "Claim",
            &[("_id", "c-9")],
            &json!({ "resourceType": "Claim" })
        ));
        assert!(hit(
            "Observation",
            &[("_id", "obs-1")],
            &observation(json!({}))
        ));
        assert!(matches!(
            error("Claim", &[("_id", "a"), ("_id", "b")]),
            SearchError::InvalidValue { .. }
        ));
        for bad in ["", "a,", "a b", "a_b"] {
            assert!(matches!(
                error("Claim", &[("_id", bad)]),
                SearchError::InvalidValue { .. }
            ));
        }
    }

    // `patient` and `subject` accept the three reference forms and read each type's element.
    #[test]
    fn patient_and_subject_name_the_patient() {
        for value in ["p1", "Patient/p1", "https://fhir.example.org/r4/Patient/p1"] {
            assert_eq!(
                search("Observation", &[("patient", value)])
                    .patient
                    .as_deref(),
                Some("p1")
            );
            assert_eq!(
                search("Observation", &[("subject", value)])
                    .patient
                    .as_deref(),
                Some("p1")
            );
        }
        let obs = observation(json!({}));
        assert!(hit("Observation", &[("patient", "p1")], &obs));
        assert!(!hit("Observation", &[("subject", "p2")], &obs));
        let reference = json!({ "reference": "Patient/p7" });
        for (resource_type, element) in [
            ("AllergyIntolerance", "patient"),
            ("Immunization", "patient"),
            ("Claim", "patient"),
            ("Coverage", "beneficiary"),
            ("Encounter", "subject"),
        ] {
            let mut resource = json!({ "resourceType": resource_type });
            resource[element] = reference.clone();
            assert!(
                hit(resource_type, &[("patient", "Patient/p7")], &resource),
                "{resource_type}"
            );
            assert!(
                !hit(resource_type, &[("patient", "p1")], &resource),
                "{resource_type}"
            );
        }
        // The same patient twice is one condition; two different ones are refused.
        assert!(hit(
            "Observation",
            &[("patient", "p1"), ("subject", "Patient/p1")],
            &obs
        ));
        for pairs in [
            vec![("patient", "p1"), ("subject", "p2")],
            vec![("patient", "p1,p2")],
            vec![("patient", "Group/g1")],
            vec![("patient", "Patient/p1/_history/2")],
            vec![("patient", "https:///Patient/")],
            vec![("patient", "")],
        ] {
            assert!(
                matches!(
                    error("Observation", &pairs),
                    SearchError::InvalidValue { .. }
                ),
                "{pairs:?}"
            );
        }
    }

    // `eq2024-03` covers the whole month and nothing after it.
    #[test]
    fn eq_month_boundaries() {
        assert!(date_hit(
            "eq2024-03",
            &observation_at("2024-03-31T23:59:59Z")
        ));
        assert!(date_hit("2024-03", &observation_at("2024-03-01T00:00:00Z")));
        assert!(!date_hit(
            "eq2024-03",
            &observation_at("2024-04-01T00:00:00Z")
        ));
        assert!(!date_hit(
            "eq2024-03",
            &observation_at("2024-02-29T23:59:59.999Z")
        ));
        assert!(date_hit("eq2024-03", &observation_at("2024-03-15")));
        // A coarser target is not contained in a finer search value.
        assert!(!date_hit("eq2024-03-15", &observation_at("2024-03")));
    }

    // Every prefix against a dateTime target.
    #[test]
    fn prefixes_against_a_date_time() {
        let target = observation_at("2024-03-01T10:00:00Z");
        for (criterion, expected) in [
            ("eq2024-03-01", true),
            ("eq2024-03-02", false),
            ("ne2024-03-01", false),
            ("ne2024-03-02", true),
            ("gt2024-02-29", true),
            ("gt2024-03-01", false),
            ("gt2024-03-01T09:59:59Z", true),
            ("lt2024-03-02", true),
            ("lt2024-03-01", false),
            ("lt2024-03-01T10:00:01Z", true),
            ("ge2024-03-01", true),
            ("ge2024-03-02", false),
            ("le2024-03-01", true),
            ("le2024-02-29", false),
            ("sa2024-02-29", true),
            ("sa2024-03-01", false),
            ("eb2024-03-02", true),
            ("eb2024-03-01", false),
            ("ap2024-03-02", true),
            ("ap2024-02-29", true),
            ("ap2024-03-03", false),
            ("ap2024-02-27", false),
        ] {
            assert_eq!(date_hit(criterion, &target), expected, "{criterion}");
        }
    }

    // Every prefix against a date-only target, which covers its whole day.
    #[test]
    fn prefixes_against_a_date() {
        let target = observation_at("2024-03-01");
        for (criterion, expected) in [
            ("eq2024-03-01", true),
            ("eq2024-03-01T00:00:00Z", false),
            ("ne2024-03-01", false),
            ("ne2024-03", false),
            ("ne2024-03-01T12:00Z", true),
            ("gt2024-03-01", false),
            ("gt2024-03-01T12:00:00Z", true),
            ("gt2024-02-29", true),
            ("lt2024-03-01", false),
            ("lt2024-03-01T12:00:00Z", true),
            ("ge2024-03-01", true),
            ("ge2024-03-02", false),
            ("le2024-03-01", true),
            ("le2024-02-29", false),
            ("sa2024-02-29", true),
            ("sa2024-03-01T00:00:00Z", false),
            ("eb2024-03-02", true),
            ("eb2024-03-01T23:59:59Z", false),
            ("ap2024-03-02", true),
            ("ap2024-03-03", false),
        ] {
            assert_eq!(date_hit(criterion, &target), expected, "{criterion}");
        }
    }

    // Every prefix against a Period with no end, which runs on forever.
    #[test]
    fn prefixes_against_an_open_period() {
        let open = observation(json!({ "effectivePeriod": { "start": "2024-03-01T08:00:00Z" } }));
        for (criterion, expected) in [
            ("eq2024", false),
            ("ne2024", true),
            ("gt2030", true),
            ("gt2024-03-01", true),
            ("lt2024-03-01T08:00:00Z", false),
            ("lt2024-03-02", true),
            ("ge2099", true),
            ("le2024-02", false),
            // Nothing of the period lies before 1 March, and it does not fit in that day.
            ("le2024-03-01", false),
            ("le2024-03-02", true),
            ("sa2024-02-29", true),
            ("sa2024-03-01", false),
            ("eb2030", false),
            ("ap2024-02-29", true),
            ("ap2024-02-28", false),
        ] {
            assert_eq!(date_hit(criterion, &open), expected, "{criterion}");
        }
        let closed = observation(json!({
            "effectivePeriod": { "start": "2024-03-01T08:00:00Z", "end": "2024-03-05" }
        }));
        assert!(date_hit("eq2024-03", &closed));
        assert!(!date_hit("eq2024-03-01", &closed));
        assert!(date_hit("lt2024-03-02", &closed));
        assert!(date_hit("gt2024-03-04", &closed));
        assert!(!date_hit("gt2024-03-05", &closed));
        assert!(date_hit("eb2024-03-06", &closed));
        // With no start it reaches back forever.
        let no_start = observation(json!({ "effectivePeriod": { "end": "2024-03-05" } }));
        assert!(date_hit("lt1900", &no_start));
        assert!(!date_hit("gt2024-03-05", &no_start));
        // Without any bound, or ending before it starts, it is no date at all.
        let empty = observation(json!({ "effectivePeriod": { "id": "x" } }));
        assert!(!date_hit("ne2024", &empty));
        let backwards = observation(json!({
            "effectivePeriod": { "start": "2024-03-05", "end": "2024-03-01" }
        }));
        assert!(!date_hit("ne2024", &backwards));
    }

    // `gt2024-03-01` needs the target to reach past that whole day.
    #[test]
    fn gt_a_day_and_a_target_on_that_day() {
        assert!(!date_hit(
            "gt2024-03-01",
            &observation_at("2024-03-01T23:59:59Z")
        ));
        assert!(!date_hit("gt2024-03-01", &observation_at("2024-03-01")));
        assert!(date_hit(
            "gt2024-03-01",
            &observation_at("2024-03-02T00:00:00Z")
        ));
        assert!(date_hit(
            "ge2024-03-01",
            &observation_at("2024-03-01T23:59:59Z")
        ));
        let crossing = observation(json!({
            "effectivePeriod": { "start": "2024-03-01T22:00:00Z", "end": "2024-03-02T01:00:00Z" }
        }));
        assert!(date_hit("gt2024-03-01", &crossing));
        assert!(date_hit("lt2024-03-02", &crossing));
    }

    // Offsets move a time to UTC, on both the search value and the target.
    #[test]
    fn time_zones_are_applied() {
        // 00:30 at +02:00 is 22:30 UTC on the day before.
        let target = observation_at("2024-03-02T00:30:00+02:00");
        assert!(date_hit("eq2024-03-01", &target));
        assert!(!date_hit("eq2024-03-02", &target));
        assert!(date_hit("eq2024-03-01T22:30:00Z", &target));
        assert!(date_hit("eq2024-03-01T17:30:00-05:00", &target));
        assert!(date_hit("gt2024-03-01T23:00:00+02:00", &target));
        assert!(!date_hit("gt2024-03-01T22:30:00Z", &target));
        // The same instant written in two zones is equal.
        assert_eq!(
            parse_date_range("2024-03-01T22:30:00Z"),
            parse_date_range("2024-03-02T00:30:00+02:00")
        );
        assert_eq!(
            parse_date_range("2024-03-01T22:30:00Z"),
            parse_date_range("2024-03-01T22:30:00-00:00")
        );
    }

    // `date` reads the date elements of other types, and any of several elements may match.
    #[test]
    fn date_reads_each_type() {
        let condition = json!({
            "resourceType": "Condition",
            "recordedDate": "2024-05-02",
            "onsetDateTime": "2019-01-01T00:00:00Z"
        });
        assert!(hit("Condition", &[("date", "2019")], &condition));
        assert!(hit("Condition", &[("date", "2024-05")], &condition));
        assert!(!hit("Condition", &[("date", "2020")], &condition));
        let encounter = json!({
            "resourceType": "Encounter",
            "period": { "start": "2024-01-01T09:00:00Z", "end": "2024-01-01T10:00:00Z" }
        });
        assert!(hit("Encounter", &[("date", "2024-01-01")], &encounter));
        assert!(!hit("Encounter", &[("date", "ge2024-01-02")], &encounter));
        let claim = json!({ "resourceType": "Claim", "created": "2023-12-31" });
        assert!(hit("Claim", &[("date", "lt2024")], &claim));
        let immunization =
            json!({ "resourceType": "Immunization", "occurrenceDateTime": "2021-06" });
        assert!(hit("Immunization", &[("date", "2021")], &immunization));
        assert!(!hit(
            "Immunization",
            &[("date", "2021-06-15")],
            &immunization
        ));
        let document =
            json!({ "resourceType": "DocumentReference", "date": "2022-02-02T02:02:02.200Z" });
        assert!(hit(
            "DocumentReference",
            &[("date", "2022-02-02")],
            &document
        ));
        let instant = observation(json!({ "effectiveInstant": "2022-02-02T02:02:02.123Z" }));
        assert!(date_hit("eq2022-02-02T02:02:02Z", &instant));
        // A string onset is not a date and matches nothing.
        let string_onset = json!({ "resourceType": "Condition", "onsetString": "2019" });
        assert!(!hit("Condition", &[("date", "2019")], &string_onset));
    }

    // `_lastUpdated` compares meta.lastUpdated on two types, and a missing one never matches.
    #[test]
    fn last_updated_reads_meta() {
        let obs = observation(json!({}));
        assert!(hit(
            "Observation",
            &[("_lastUpdated", "ge2024-05-01")],
            &obs
        ));
        assert!(!hit(
            "Observation",
            &[("_lastUpdated", "gt2024-05-01")],
            &obs
        ));
        assert!(hit(
            "Observation",
            &[("_lastUpdated", "2024-05-01T12:00:00Z")],
            &obs
        ));
        let coverage = json!({
            "resourceType": "Coverage",
            "meta": { "lastUpdated": "2023-01-01T00:00:00.000Z" }
        });
        assert!(hit(
            "Coverage",
            &[("_lastUpdated", "lt2023-01-02")],
            &coverage
        ));
        assert!(!hit("Coverage", &[("_lastUpdated", "sa2023")], &coverage));
        assert!(!hit(
            "Coverage",
            &[("_lastUpdated", "ne2020")],
            &json!({ "resourceType": "Coverage" })
        ));
    }

    // Impossible or malformed dates are refused, and valid edge dates are accepted.
    #[test]
    fn invalid_dates_are_refused() {
        for bad in [
            "2023-02-29",
            "2023-13",
            "2023-00",
            "2023-04-31",
            "2023-01-00",
            "0000",
            "24",
            "2024-3-01",
            "2024-03-01T",
            "2024-03-01T24:00:00Z",
            "2024-03-01T10:60:00Z",
            "2024-03-01T10:00:61Z",
            "2024-03-01T10:00:00.Z",
            "2024-03-01T10:00:00+2:00",
            "2024-03-01T10:00:00+15:00",
            "2024-03-01T10:00:00ZZ",
            "2024-03-01 10:00:00Z",
            "2024-03-01Z",
            "junk",
            "ge",
            "xx2024",
            "2024-03-01T10:00:00+02:00junk",
            "２０２４",
            "",
        ] {
            assert!(
                matches!(
                    error("Observation", &[("date", bad)]),
                    SearchError::InvalidValue { .. }
                ),
                "{bad}"
            );
        }
        assert!(DateRange::parse("2024-02-29").is_some());
        assert!(DateRange::parse("2000-02-29").is_some());
        assert!(DateRange::parse("1900-02-29").is_none());
        assert!(DateRange::parse("0001-01-01T00:00:00-14:00").is_some());
        assert!(DateRange::parse("9999-12-31T23:59:59.999+14:00").is_some());
        assert!(matches!(
            error("Observation", &[("_lastUpdated", "2024-02-30")]),
            SearchError::InvalidValue { .. }
        ));
    }

    // Ranges follow the written precision, down to fractions of a second.
    #[test]
    fn precision_sets_the_range() {
        let range = |text: &str| parse_date_range(text).expect("a date");
        let day = range("1970-01-02");
        assert_eq!(day, (DAY_MS, 2 * DAY_MS));
        assert_eq!(range("1970"), (0, 365 * DAY_MS));
        assert_eq!(range("1972-02").1 - range("1972-02").0, 29 * DAY_MS);
        assert_eq!(range("2024-12").1, range("2025").0);
        assert_eq!(range("1970-01-01T00:01Z"), (60_000, 120_000));
        assert_eq!(range("1970-01-01T00:00:01Z"), (1000, 2000));
        assert_eq!(range("1970-01-01T00:00:01.5Z"), (1500, 1600));
        assert_eq!(range("1970-01-01T00:00:01.25Z"), (1250, 1260));
        assert_eq!(range("1970-01-01T00:00:01.125Z"), (1125, 1126));
        assert_eq!(range("1970-01-01T00:00:01.1259Z"), (1125, 1126));
        assert_eq!(range("1970-01-01T00:00:00"), (0, 1000));
        assert_eq!(range("1969-12-31"), (-DAY_MS, 0));
        // 2000-03-01 is 11017 days after the epoch.
        assert_eq!(range("2000-03-01").0, 11_017 * DAY_MS);
        assert_eq!(range("2024-03-01T00:00:00.000Z").0, 1_709_251_200_000);
    }

    // Sorting by date ascending and descending puts resources without a date last.
    #[test]
    fn sort_by_date_puts_missing_last() {
        let mut resources = vec![
            json!({ "id": "none" }),
            json!({ "id": "mar", "effectiveDateTime": "2024-03-01" }),
            json!({ "id": "jan", "effectiveDateTime": "2024-01-15T10:00:00Z" }),
            json!({ "id": "open", "effectivePeriod": { "start": "2024-02-01" } }),
            json!({ "id": "bad", "effectiveDateTime": "2024-02-30" }),
        ];
        let keys = search("Observation", &[("_sort", "date")]).sort;
        sort("Observation", &keys, &mut resources);
        assert_eq!(ids(&resources), ["jan", "open", "mar", "none", "bad"]);
        let keys = search("Observation", &[("_sort", "-date")]).sort;
        sort("Observation", &keys, &mut resources);
        // The open period ends latest of all.
        assert_eq!(ids(&resources), ["open", "mar", "jan", "none", "bad"]);
    }

    // Sorting by _lastUpdated, _id and status, with several keys and ties kept in order.
    #[test]
    fn sort_by_other_keys_is_stable() {
        let resource = |id: &str, status: Option<&str>, updated: &str| {
            let mut value = json!({ "id": id, "meta": { "lastUpdated": updated } });
            if let Some(status) = status {
                value["status"] = json!(status);
            }
            value
        };
        let mut resources = vec![
            resource("b", Some("final"), "2024-01-02T00:00:00Z"),
            resource("a", None, "2024-01-01T00:00:00Z"),
            resource("d", Some("amended"), "2024-01-03T00:00:00Z"),
            resource("c", Some("final"), "2024-01-01T00:00:00Z"),
        ];
        let keys = search("Observation", &[("_sort", "-_lastUpdated")]).sort;
        sort("Observation", &keys, &mut resources);
        assert_eq!(ids(&resources), ["d", "b", "a", "c"]);
        let keys = search("Observation", &[("_sort", "_id")]).sort;
        sort("Observation", &keys, &mut resources);
        assert_eq!(ids(&resources), ["a", "b", "c", "d"]);
        let keys = search("Observation", &[("_sort", "-status,_lastUpdated")]).sort;
        sort("Observation", &keys, &mut resources);
        assert_eq!(ids(&resources), ["c", "b", "d", "a"]);
        // Equal keys keep the order they came in.
        let keys = search("Observation", &[("_sort", "status")]).sort;
        let mut ties = vec![
            resource("x", Some("final"), "2024-01-01T00:00:00Z"),
            resource("y", Some("final"), "2024-01-01T00:00:00Z"),
            resource("w", Some("amended"), "2024-01-01T00:00:00Z"),
        ];
        sort("Observation", &keys, &mut ties);
        assert_eq!(ids(&ties), ["w", "x", "y"]);
        let mut claims = vec![json!({ "id": "b" }), json!({ "id": "a" })];
        sort(
            "Claim",
            &search("Claim", &[("_sort", "-_id")]).sort,
            &mut claims,
        );
        assert_eq!(ids(&claims), ["b", "a"]);
    }

    // Sort keys outside the supported set are refused.
    #[test]
    fn unsupported_sort_keys_are_refused() {
        for value in ["code", "-name", "date,subject"] {
            assert!(matches!(
                error("Observation", &[("_sort", value)]),
                SearchError::Unsupported { .. }
            ));
        }
        assert!(matches!(
            error("Condition", &[("_sort", "status")]),
            SearchError::Unsupported { .. }
        ));
        for value in ["", "-", "date,"] {
            assert!(matches!(
                error("Observation", &[("_sort", value)]),
                SearchError::InvalidValue { .. }
            ));
        }
    }

    // Unknown parameters, modifiers, _revinclude, _elements and other includes are refused.
    #[test]
    fn unknown_and_unsupported_parameters_are_refused() {
        assert_eq!(
            error("Observation", &[("value-quantity", "5")]),
            SearchError::UnknownParameter("value-quantity".to_owned())
        );
        assert_eq!(
            error("Observation", &[("subject.name", "x")]),
            SearchError::UnknownParameter("subject.name".to_owned())
        );
        assert_eq!(
            error("Observation", &[("code:text", "heart")]),
            SearchError::UnsupportedModifier {
                parameter: "code".to_owned(),
                modifier: "text".to_owned()
            }
        );
        for name in [
            "code:not",
            "status:missing",
            "date:exact",
            "subject:Patient",
            "_include:iterate",
        ] {
            assert!(matches!(
                error("Observation", &[(name, "x")]),
                SearchError::UnsupportedModifier { .. }
            ));
        }
        assert_eq!(
            error("Observation", &[("nothing:exact", "x")]),
            SearchError::UnknownParameter("nothing".to_owned())
        );
        for pairs in [
            [("_revinclude", "Provenance:target")],
            [("_elements", "id,code")],
            [("_include", "Observation:performer")],
            [("_include", "Encounter:patient")],
            [("_include", "Observation:subject:Group")],
            [("_summary", "true")],
            [("_summary", "false")],
        ] {
            assert!(
                matches!(
                    error("Observation", &pairs),
                    SearchError::Unsupported { .. }
                ),
                "{pairs:?}"
            );
        }
        for value in [
            "Observation:patient",
            "Observation:subject",
            "*",
            "*:subject",
            "Observation:subject:Patient",
        ] {
            assert!(
                search("Observation", &[("_include", value)]).include_patient,
                "{value}"
            );
        }
        assert!(search("Coverage", &[("_include", "Coverage:patient")]).include_patient);
        assert!(search("Observation", &[("_summary", "count")]).summary_count);
        // Formatting parameters are accepted and change nothing.
        let plain = search("Observation", &[]);
        assert_eq!(
            search("Observation", &[("_format", "json"), ("_pretty", "true")]),
            plain
        );
    }

    // `_count` is a non-negative integer clamped to the maximum, and `_offset` likewise.
    #[test]
    fn count_and_offset() {
        assert_eq!(search("Observation", &[]).count, 20);
        assert_eq!(search("Observation", &[]).offset, 0);
        assert_eq!(
            parse("Observation", &[], 500, 100).map(|p| p.count),
            Ok(100)
        );
        assert_eq!(search("Observation", &[("_count", "0")]).count, 0);
        assert_eq!(search("Observation", &[("_count", "7")]).count, 7);
        assert_eq!(search("Observation", &[("_count", "1000")]).count, MAX);
        assert_eq!(
            search("Observation", &[("_count", "99999999999999999999999")]).count,
            MAX
        );
        assert_eq!(search("Observation", &[("_offset", "40")]).offset, 40);
        for bad in ["-1", "", "1.5", "ten", "+3", " 3", "３"] {
            assert!(
                matches!(
                    error("Observation", &[("_count", bad)]),
                    SearchError::InvalidValue { .. }
                ),
                "{bad}"
            );
            assert!(
                matches!(
                    error("Observation", &[("_offset", bad)]),
                    SearchError::InvalidValue { .. }
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            error("Observation", &[("_offset", "99999999999999999999999")]),
            SearchError::InvalidValue { .. }
        ));
        assert!(matches!(
            error("Observation", &[("_count", "1"), ("_count", "2")]),
            SearchError::InvalidValue { .. }
        ));
    }

    // Escaped separators stay part of a token, and malformed tokens are refused.
    #[test]
    fn token_escapes_and_malformed_tokens() {
        let tokens =
            |value: &str| match search("Observation", &[("code", value)]).filters.as_slice() {
                [Filter::Code(tokens)] => tokens.clone(),
                other => panic!("unexpected filters {other:?}"),
            };
        assert_eq!(
            tokens(r"urn:a\|b|c\,d,e"),
            vec![
                Token::SystemAndCode {
                    system: "urn:a|b".to_owned(),
                    code: "c,d".to_owned()
                },
                Token::Code("e".to_owned())
            ]
        );
        assert_eq!(tokens(r"a\\"), vec![Token::Code(r"a\".to_owned())]);
        let odd = json!({ "resourceType": "Observation", "code": concept(Some("urn:a|b"), "c,d") });
        assert!(hit("Observation", &[("code", r"urn:a\|b|c\,d")], &odd));
        for bad in ["", "|", "a|b|c", "a,,b", ",", r"a\", r"a\x"] {
            assert!(
                matches!(
                    error("Observation", &[("code", bad)]),
                    SearchError::InvalidValue { .. }
                ),
                "{bad}"
            );
        }
    }

    // The canonical query parses back to the same search, at offset 0.
    #[test]
    fn self_query_round_trips() {
        let cases: [&[(&str, &str)]; 4] = [
            &[],
            &[
                ("subject", "https://x.example/Patient/p1"),
                ("_id", "a,b"),
                ("code", r"http://loinc.org|8867-4,|hr,x\,y,urn:s|"),
                ("code", "other"),
                ("date", "ge2024-03,lt2024-04-01T00:00:00+02:00"),
                ("date", "2024"),
                ("_lastUpdated", "sa2023-01-01T10:00:00.5Z"),
                ("status", "final"),
                ("category", "vital-signs"),
                ("_sort", "-date,_id,status"),
                ("_count", "5"),
                ("_offset", "10"),
                ("_include", "*"),
                ("_summary", "count"),
                ("_format", "json"),
            ],
            &[("_count", "0"), ("_offset", "3")],
            &[("patient", "p2"), ("date", "eq2024,ne2025,ap2026-06")],
        ];
        for pairs in cases {
            let params = search("Observation", pairs);
            let again = parse("Observation", &self_query("Observation", &params), 20, MAX)
                .expect("the canonical query parses");
            assert_eq!(
                again,
                SearchParams {
                    offset: 0,
                    ..params.clone()
                },
                "{pairs:?}"
            );
        }
        let params = search(
            "Encounter",
            &[("_include", "Encounter:subject"), ("category", "AMB")],
        );
        let query = self_query("Encounter", &params);
        assert!(query.contains(&("_include".to_owned(), "Encounter:patient".to_owned())));
        assert!(!query.iter().any(|(name, _)| name == "_offset"));
        assert_eq!(parse("Encounter", &query, 20, MAX), Ok(params));
    }

    // Every listed parameter parses for its type, and the lists agree with what is refused.
    #[test]
    fn search_parameters_agree_with_parse() {
        for (resource_type, _) in medledger_core::model::RESOURCE_TYPES {
            let listed = search_parameters(resource_type);
            for name in ["_id", "_lastUpdated", "patient", "subject", "date"] {
                assert!(
                    listed.iter().any(|(n, _, _)| *n == name),
                    "{resource_type} {name}"
                );
            }
            for name in ["code", "category", "status", "value", "_text"] {
                let is_listed = listed.iter().any(|(n, _, _)| *n == name);
                let parsed = parse(resource_type, &query(&[(name, "x")]), 20, MAX);
                assert_eq!(parsed.is_ok(), is_listed, "{resource_type} {name}");
            }
            for (name, kind, doc) in listed {
                assert!(["token", "date", "reference"].contains(&kind));
                assert!(!doc.is_empty());
                let value = match kind {
                    "date" => "ge2024",
                    "reference" => "Patient/p1",
                    _ => "x",
                };
                assert!(
                    parse(resource_type, &query(&[(name, value)]), 20, MAX).is_ok(),
                    "{name}"
                );
            }
        }
        assert!(search_parameters("Practitioner").is_empty());
    }

    // Resources of unexpected shapes or types never panic and simply do not match.
    #[test]
    fn odd_resources_do_not_match() {
        let params = search(
            "Observation",
            &[
                ("code", "x"),
                ("date", "2024"),
                ("patient", "p1"),
                ("_lastUpdated", "2024"),
            ],
        );
        for resource in [
            json!(null),
            json!([1, 2]),
            json!("Observation"),
            json!({ "resourceType": "Observation", "code": 5, "effectiveDateTime": 2024, "subject": "Patient/p1", "meta": [] }),
            json!({ "resourceType": "Observation", "code": { "coding": "x" }, "effectivePeriod": { "start": 1 } }),
            json!({ "resourceType": "Condition", "code": concept(None, "x") }),
        ] {
            assert!(!matches("Observation", &params, &resource));
        }
        let mut odd = vec![json!(null), json!({ "effectiveDateTime": ["x"] }), json!(7)];
        sort(
            "Observation",
            &search("Observation", &[("_sort", "date,-_id")]).sort,
            &mut odd,
        );
        sort(
            "Unknown",
            &[SortKey {
                field: SortField::Date,
                descending: false,
            }],
            &mut odd,
        );
        assert!(!matches(
            "Practitioner",
            &search("Observation", &[]),
            &json!({})
        ));
        // A search with no conditions matches any resource of the type.
        assert!(matches(
            "Observation",
            &search("Observation", &[]),
            &json!({ "resourceType": "Observation" })
        ));
    }
}
