//! FHIR R4 resources as a custodian accepts them: parsed, checked against the parts of the
//! R4 specification that are cheap to check, and given their version identity.
//!
//! **Checked** by [`check_resource`]:
//! - size (at most [`RESOURCE_BYTES_MAX`]), UTF-8, one JSON value with no duplicate keys in
//!   any object, a JSON object with a string `resourceType` naming one of the 17 types of
//!   [`medledger_core::model::RESOURCE_TYPES`];
//! - the general FHIR JSON rules, everywhere in the resource: no `null` (except in an array
//!   of primitives beside a `_name` array of the same length holding something at that
//!   index), no empty object, array or string, no array inside an array; `_name` siblings
//!   are objects (or arrays of objects and nulls matching their primitive array);
//! - resource ids (`id`, `meta.versionId`) are FHIR ids; `meta` holds only R4 meta elements;
//! - extensions have a `url` and either one `value[x]` or nested extensions (ext-1);
//! - contained resources have a `resourceType` and an `id`, and no contained resources
//!   (dom-2), `meta.versionId`, `meta.lastUpdated` (dom-4) or security labels (dom-5);
//! - per supported type (one table each, below): every top-level element is an R4 element
//!   of the type (DomainResource elements and `_name` siblings of primitives included),
//!   repeating elements are arrays and the others are not, top-level primitives have their
//!   R4 type, a choice element `name[x]` has one of its R4 type suffixes and at most one
//!   value, and the elements of minimum cardinality 1 are present (with a value: an
//!   extension alone does not count);
//! - primitives found by a name whose R4 type is known wherever it occurs: `status`,
//!   `contentType`, `Coding.code`, `Quantity.code` and `.comparator` are codes;
//!   `Coding.system` and `Extension.url` are URIs; `Period.start` and `.end`, `date` and
//!   names ending in `Date`/`DateTime` are dateTimes (a date is one); names ending in
//!   `Instant` and `meta.lastUpdated` are instants; names ending in `Boolean`,
//!   `Coding.userSelected` and a few known flags are booleans; names ending in `Integer`
//!   are integers; `Quantity.value` (and of its kin: Age, Duration, Money, ...) is a number;
//! - the patient: the element that points to the patient for the type (`subject` for most,
//!   `patient` for AllergyIntolerance, Immunization and Claim, `beneficiary` for Coverage) is
//!   a Reference to `"Patient/<id>"` (and `type`, if given, is `Patient`), even where R4 lets
//!   the element be absent;
//! - attachment urls that start with `cid:` (in DocumentReference.content and
//!   DiagnosticReport.presentedForm) name a well-formed content id.
//!
//! **Not checked**: terminology bindings (which codes are allowed), the elements of nested
//! structures and their cardinality (beyond the names above), the types of nested elements
//! not named above, references other than the patient's, narrative XHTML, the
//! specification's invariants other than ext-1 and dom-2/4/5, profiles, and the precision
//! of decimals (which a `serde_json::Value` does not keep).
//!
//! Error messages name the JSON path of what is wrong and why; they never repeat the
//! resource's content, so they are safe to log.

use std::cell::RefCell;
use std::fmt;

use medledger_core::contracts::{is_valid_cid, is_valid_record_id as is_fhir_id};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Largest resource accepted, in bytes of JSON.
pub const RESOURCE_BYTES_MAX: usize = 1 << 20;

/// Largest attachment size R4 can state (`Attachment.size` is an unsignedInt).
pub const ATTACHMENT_SIZE_MAX: u64 = i32::MAX as u64;

/// A resource that passed `check_resource`.
#[derive(Debug, Clone)]
pub struct CheckedResource {
    pub resource_type: String,
    /// The patient pseudonym the resource is about (from its patient reference "Patient/<id>").
    pub patient: String,
    /// The resource's `id`, if it has one.
    pub id: Option<String>,
    /// The resource as a JSON object.
    pub value: Value,
}

/// Why a resource (or an attachment for it) was refused. Paths are FHIRPath-like, rooted at
/// the resource type: `Observation.code.coding[0].system`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirError {
    #[error("the resource is {size} bytes; at most {RESOURCE_BYTES_MAX} are accepted")]
    TooLarge { size: usize },
    #[error("the resource is not UTF-8 (invalid byte sequence at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("the resource is not valid JSON: {reason}")]
    InvalidJson { reason: String },
    #[error("the resource is not a JSON object")]
    NotAnObject,
    #[error("the resource has no resourceType string")]
    MissingResourceType,
    #[error(
        "resourceType is not a supported type (AllergyIntolerance, CarePlan, Condition, \
         Procedure, DiagnosticReport, ImagingStudy, Observation, Specimen, Immunization, \
         MedicationRequest, MedicationStatement, Composition, DocumentReference, Encounter, \
         Claim, Coverage)"
    )]
    UnsupportedType,
    #[error("{path} occurs twice in one object; JSON keys must be unique")]
    DuplicateKey { path: String },
    #[error(
        "{path} is null; FHIR JSON omits absent elements (null only stands in an array of \
         primitives for an entry that has only its `_` extension)"
    )]
    Null { path: String },
    #[error("{path} is empty; FHIR JSON has no empty objects, arrays or strings")]
    Empty { path: String },
    #[error("{path} is not a FHIR id (1 to 64 of A-Z, a-z, 0-9, '-', '.')")]
    InvalidId { path: String },
    #[error("{path} is not an element of this resource type in FHIR R4")]
    UnknownElement { path: String },
    #[error("{path} is required (minimum cardinality 1) but has no value")]
    MissingElement { path: String },
    #[error("{path} has values of more than one type; a choice element has one value")]
    ChoiceConflict { path: String },
    #[error("{path} must be {expected}")]
    WrongType {
        path: String,
        expected: &'static str,
    },
    #[error("{path} must be {expected}")]
    InvalidValue {
        path: String,
        expected: &'static str,
    },
    #[error(
        "{path} does not match its primitive: an object beside a single value, an array of \
         the same length beside an array"
    )]
    PrimitiveExtensionMismatch { path: String },
    #[error("{path} is not a valid extension: {reason}")]
    InvalidExtension { path: String, reason: &'static str },
    #[error("{path} is not a valid contained resource: {reason}")]
    InvalidContained { path: String, reason: &'static str },
    #[error("{path} is required: the reference to the patient the resource is about")]
    MissingPatient { path: String },
    #[error("{path} must refer to the patient as a relative reference \"Patient/<id>\"")]
    InvalidPatientReference { path: String },
    #[error(
        "this resource type keeps no attachments (only DocumentReference.content and \
         DiagnosticReport.presentedForm do)"
    )]
    AttachmentsNotSupported,
    #[error("{path} cannot be added: {reason}")]
    InvalidAttachment { path: String, reason: &'static str },
}

// ---- element tables ---------------------------------------------------------------------

/// The R4 type of an element, as far as checking it goes: primitives by their own rules,
/// complex types (named for reading the tables) all as JSON objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Code,
    Str,
    /// uri, url, canonical.
    Uri,
    Id,
    Date,
    DateTime,
    Instant,
    Time,
    Int,
    PosInt,
    UInt,
    Decimal,
    Resource,
    Ref,
    Concept,
    Coding,
    Identifier,
    Period,
    Quantity,
    Annotation,
    Attachment,
    Dosage,
    Money,
    Backbone,
    /// Any other complex type (Meta, Narrative, Extension, Age, Range, Ratio, Timing, ...).
    Obj,
}

use Ty::*;

impl Ty {
    fn is_primitive(self) -> bool {
        matches!(
            self,
            Bool | Code
                | Str
                | Uri
                | Id
                | Date
                | DateTime
                | Instant
                | Time
                | Int
                | PosInt
                | UInt
                | Decimal
        )
    }
}

/// The type of a choice element's variant, from its suffix (`valueQuantity` → Quantity).
fn choice_type(suffix: &str) -> Ty {
    match suffix {
        "Boolean" => Bool,
        "Integer" => Int,
        "String" => Str,
        "Time" => Time,
        "Date" => Date,
        "DateTime" => DateTime,
        "Instant" => Instant,
        _ => Obj,
    }
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    /// 0..1 or 1..1.
    One(Ty),
    /// 0..* or 1..*: always an array in JSON.
    Many(Ty),
    /// `name[x]`, 0..1 or 1..1: one of `name<Suffix>`.
    Choice(&'static [&'static str]),
}

struct El {
    name: &'static str,
    shape: Shape,
    required: bool,
}

impl El {
    /// The name as R4 writes it: `value[x]` for a choice.
    fn display_name(&self) -> String {
        match self.shape {
            Shape::Choice(_) => format!("{}[x]", self.name),
            _ => self.name.to_owned(),
        }
    }
}

/// 0..1
const fn opt(name: &'static str, ty: Ty) -> El {
    El {
        name,
        shape: Shape::One(ty),
        required: false,
    }
}
/// 1..1
const fn req(name: &'static str, ty: Ty) -> El {
    El {
        name,
        shape: Shape::One(ty),
        required: true,
    }
}
/// 0..*
const fn list(name: &'static str, ty: Ty) -> El {
    El {
        name,
        shape: Shape::Many(ty),
        required: false,
    }
}
/// 1..*
const fn req_list(name: &'static str, ty: Ty) -> El {
    El {
        name,
        shape: Shape::Many(ty),
        required: true,
    }
}
/// `name[x]` 0..1
const fn choice(name: &'static str, types: &'static [&'static str]) -> El {
    El {
        name,
        shape: Shape::Choice(types),
        required: false,
    }
}
/// `name[x]` 1..1
const fn req_choice(name: &'static str, types: &'static [&'static str]) -> El {
    El {
        name,
        shape: Shape::Choice(types),
        required: true,
    }
}

struct TypeSpec {
    name: &'static str,
    /// The element that refers to the patient.
    patient: &'static str,
    elements: &'static [El],
}

/// The elements every DomainResource has.
const DOMAIN_RESOURCE: &[El] = &[
    opt("id", Id),
    opt("meta", Obj),
    opt("implicitRules", Uri),
    opt("language", Code),
    opt("text", Obj),
    list("contained", Resource),
    list("extension", Obj),
    list("modifierExtension", Obj),
];

/// The elements of Resource.meta.
const META_ELEMENTS: &[&str] = &[
    "id",
    "extension",
    "versionId",
    "lastUpdated",
    "source",
    "profile",
    "security",
    "tag",
];

const ONSET: &[&str] = &["DateTime", "Age", "Period", "Range", "String"];
const MEDICATION: &[&str] = &["CodeableConcept", "Reference"];

const ALLERGY_INTOLERANCE: &[El] = &[
    list("identifier", Identifier),
    opt("clinicalStatus", Concept),
    opt("verificationStatus", Concept),
    opt("type", Code),
    list("category", Code),
    opt("criticality", Code),
    opt("code", Concept),
    req("patient", Ref),
    opt("encounter", Ref),
    choice("onset", ONSET),
    opt("recordedDate", DateTime),
    opt("recorder", Ref),
    opt("asserter", Ref),
    opt("lastOccurrence", DateTime),
    list("note", Annotation),
    list("reaction", Backbone),
];

const CARE_PLAN: &[El] = &[
    list("identifier", Identifier),
    list("instantiatesCanonical", Uri),
    list("instantiatesUri", Uri),
    list("basedOn", Ref),
    list("replaces", Ref),
    list("partOf", Ref),
    req("status", Code),
    req("intent", Code),
    list("category", Concept),
    opt("title", Str),
    opt("description", Str),
    req("subject", Ref),
    opt("encounter", Ref),
    opt("period", Period),
    opt("created", DateTime),
    opt("author", Ref),
    list("contributor", Ref),
    list("careTeam", Ref),
    list("addresses", Ref),
    list("supportingInfo", Ref),
    list("goal", Ref),
    list("activity", Backbone),
    list("note", Annotation),
];

const CONDITION: &[El] = &[
    list("identifier", Identifier),
    opt("clinicalStatus", Concept),
    opt("verificationStatus", Concept),
    list("category", Concept),
    opt("severity", Concept),
    opt("code", Concept),
    list("bodySite", Concept),
    req("subject", Ref),
    opt("encounter", Ref),
    choice("onset", ONSET),
    choice("abatement", ONSET),
    opt("recordedDate", DateTime),
    opt("recorder", Ref),
    opt("asserter", Ref),
    list("stage", Backbone),
    list("evidence", Backbone),
    list("note", Annotation),
];

const PROCEDURE: &[El] = &[
    list("identifier", Identifier),
    list("instantiatesCanonical", Uri),
    list("instantiatesUri", Uri),
    list("basedOn", Ref),
    list("partOf", Ref),
    req("status", Code),
    opt("statusReason", Concept),
    opt("category", Concept),
    opt("code", Concept),
    req("subject", Ref),
    opt("encounter", Ref),
    choice(
        "performed",
        &["DateTime", "Period", "String", "Age", "Range"],
    ),
    opt("recorder", Ref),
    opt("asserter", Ref),
    list("performer", Backbone),
    opt("location", Ref),
    list("reasonCode", Concept),
    list("reasonReference", Ref),
    list("bodySite", Concept),
    opt("outcome", Concept),
    list("report", Ref),
    list("complication", Concept),
    list("complicationDetail", Ref),
    list("followUp", Concept),
    list("note", Annotation),
    list("focalDevice", Backbone),
    list("usedReference", Ref),
    list("usedCode", Concept),
];

const DIAGNOSTIC_REPORT: &[El] = &[
    list("identifier", Identifier),
    list("basedOn", Ref),
    req("status", Code),
    list("category", Concept),
    req("code", Concept),
    opt("subject", Ref),
    opt("encounter", Ref),
    choice("effective", &["DateTime", "Period"]),
    opt("issued", Instant),
    list("performer", Ref),
    list("resultsInterpreter", Ref),
    list("specimen", Ref),
    list("result", Ref),
    list("imagingStudy", Ref),
    list("media", Backbone),
    opt("conclusion", Str),
    list("conclusionCode", Concept),
    list("presentedForm", Attachment),
];

const IMAGING_STUDY: &[El] = &[
    list("identifier", Identifier),
    req("status", Code),
    list("modality", Coding),
    req("subject", Ref),
    opt("encounter", Ref),
    opt("started", DateTime),
    list("basedOn", Ref),
    opt("referrer", Ref),
    list("interpreter", Ref),
    list("endpoint", Ref),
    opt("numberOfSeries", UInt),
    opt("numberOfInstances", UInt),
    opt("procedureReference", Ref),
    list("procedureCode", Concept),
    opt("location", Ref),
    list("reasonCode", Concept),
    list("reasonReference", Ref),
    list("note", Annotation),
    opt("description", Str),
    list("series", Backbone),
];

const OBSERVATION: &[El] = &[
    list("identifier", Identifier),
    list("basedOn", Ref),
    list("partOf", Ref),
    req("status", Code),
    list("category", Concept),
    req("code", Concept),
    opt("subject", Ref),
    list("focus", Ref),
    opt("encounter", Ref),
    choice("effective", &["DateTime", "Period", "Timing", "Instant"]),
    opt("issued", Instant),
    list("performer", Ref),
    choice(
        "value",
        &[
            "Quantity",
            "CodeableConcept",
            "String",
            "Boolean",
            "Integer",
            "Range",
            "Ratio",
            "SampledData",
            "Time",
            "DateTime",
            "Period",
        ],
    ),
    opt("dataAbsentReason", Concept),
    list("interpretation", Concept),
    list("note", Annotation),
    opt("bodySite", Concept),
    opt("method", Concept),
    opt("specimen", Ref),
    opt("device", Ref),
    list("referenceRange", Backbone),
    list("hasMember", Ref),
    list("derivedFrom", Ref),
    list("component", Backbone),
];

const SPECIMEN: &[El] = &[
    list("identifier", Identifier),
    opt("accessionIdentifier", Identifier),
    opt("status", Code),
    opt("type", Concept),
    opt("subject", Ref),
    opt("receivedTime", DateTime),
    list("parent", Ref),
    list("request", Ref),
    opt("collection", Backbone),
    list("processing", Backbone),
    list("container", Backbone),
    list("condition", Concept),
    list("note", Annotation),
];

const IMMUNIZATION: &[El] = &[
    list("identifier", Identifier),
    req("status", Code),
    opt("statusReason", Concept),
    req("vaccineCode", Concept),
    req("patient", Ref),
    opt("encounter", Ref),
    req_choice("occurrence", &["DateTime", "String"]),
    opt("recorded", DateTime),
    opt("primarySource", Bool),
    opt("reportOrigin", Concept),
    opt("location", Ref),
    opt("manufacturer", Ref),
    opt("lotNumber", Str),
    opt("expirationDate", Date),
    opt("site", Concept),
    opt("route", Concept),
    opt("doseQuantity", Quantity),
    list("performer", Backbone),
    list("note", Annotation),
    list("reasonCode", Concept),
    list("reasonReference", Ref),
    opt("isSubpotent", Bool),
    list("subpotentReason", Concept),
    list("education", Backbone),
    list("programEligibility", Concept),
    opt("fundingSource", Concept),
    list("reaction", Backbone),
    list("protocolApplied", Backbone),
];

const MEDICATION_REQUEST: &[El] = &[
    list("identifier", Identifier),
    req("status", Code),
    opt("statusReason", Concept),
    req("intent", Code),
    list("category", Concept),
    opt("priority", Code),
    opt("doNotPerform", Bool),
    choice("reported", &["Boolean", "Reference"]),
    req_choice("medication", MEDICATION),
    req("subject", Ref),
    opt("encounter", Ref),
    list("supportingInformation", Ref),
    opt("authoredOn", DateTime),
    opt("requester", Ref),
    opt("performer", Ref),
    opt("performerType", Concept),
    opt("recorder", Ref),
    list("reasonCode", Concept),
    list("reasonReference", Ref),
    list("instantiatesCanonical", Uri),
    list("instantiatesUri", Uri),
    list("basedOn", Ref),
    opt("groupIdentifier", Identifier),
    opt("courseOfTherapyType", Concept),
    list("insurance", Ref),
    list("note", Annotation),
    list("dosageInstruction", Dosage),
    opt("dispenseRequest", Backbone),
    opt("substitution", Backbone),
    opt("priorPrescription", Ref),
    list("detectedIssue", Ref),
    list("eventHistory", Ref),
];

const MEDICATION_STATEMENT: &[El] = &[
    list("identifier", Identifier),
    list("basedOn", Ref),
    list("partOf", Ref),
    req("status", Code),
    list("statusReason", Concept),
    opt("category", Concept),
    req_choice("medication", MEDICATION),
    req("subject", Ref),
    opt("context", Ref),
    choice("effective", &["DateTime", "Period"]),
    opt("dateAsserted", DateTime),
    opt("informationSource", Ref),
    list("derivedFrom", Ref),
    list("reasonCode", Concept),
    list("reasonReference", Ref),
    list("note", Annotation),
    list("dosage", Dosage),
];

const COMPOSITION: &[El] = &[
    opt("identifier", Identifier),
    req("status", Code),
    req("type", Concept),
    list("category", Concept),
    opt("subject", Ref),
    opt("encounter", Ref),
    req("date", DateTime),
    req_list("author", Ref),
    req("title", Str),
    opt("confidentiality", Code),
    list("attester", Backbone),
    opt("custodian", Ref),
    list("relatesTo", Backbone),
    list("event", Backbone),
    list("section", Backbone),
];

const DOCUMENT_REFERENCE: &[El] = &[
    opt("masterIdentifier", Identifier),
    list("identifier", Identifier),
    req("status", Code),
    opt("docStatus", Code),
    opt("type", Concept),
    list("category", Concept),
    opt("subject", Ref),
    opt("date", Instant),
    list("author", Ref),
    opt("authenticator", Ref),
    opt("custodian", Ref),
    list("relatesTo", Backbone),
    opt("description", Str),
    list("securityLabel", Concept),
    req_list("content", Backbone),
    opt("context", Backbone),
];

const ENCOUNTER: &[El] = &[
    list("identifier", Identifier),
    req("status", Code),
    list("statusHistory", Backbone),
    req("class", Coding),
    list("classHistory", Backbone),
    list("type", Concept),
    opt("serviceType", Concept),
    opt("priority", Concept),
    opt("subject", Ref),
    list("episodeOfCare", Ref),
    list("basedOn", Ref),
    list("participant", Backbone),
    list("appointment", Ref),
    opt("period", Period),
    opt("length", Obj),
    list("reasonCode", Concept),
    list("reasonReference", Ref),
    list("diagnosis", Backbone),
    list("account", Ref),
    opt("hospitalization", Backbone),
    list("location", Backbone),
    opt("serviceProvider", Ref),
    opt("partOf", Ref),
];

const CLAIM: &[El] = &[
    list("identifier", Identifier),
    req("status", Code),
    req("type", Concept),
    opt("subType", Concept),
    req("use", Code),
    req("patient", Ref),
    opt("billablePeriod", Period),
    req("created", DateTime),
    opt("enterer", Ref),
    opt("insurer", Ref),
    req("provider", Ref),
    req("priority", Concept),
    opt("fundsReserve", Concept),
    list("related", Backbone),
    opt("prescription", Ref),
    opt("originalPrescription", Ref),
    opt("payee", Backbone),
    opt("referral", Ref),
    opt("facility", Ref),
    list("careTeam", Backbone),
    list("supportingInfo", Backbone),
    list("diagnosis", Backbone),
    list("procedure", Backbone),
    req_list("insurance", Backbone),
    opt("accident", Backbone),
    list("item", Backbone),
    opt("total", Money),
];

const COVERAGE: &[El] = &[
    list("identifier", Identifier),
    req("status", Code),
    opt("type", Concept),
    opt("policyHolder", Ref),
    opt("subscriber", Ref),
    opt("subscriberId", Str),
    req("beneficiary", Ref),
    opt("dependent", Str),
    opt("relationship", Concept),
    opt("period", Period),
    req_list("payor", Ref),
    list("class", Backbone),
    opt("order", PosInt),
    opt("network", Str),
    list("costToBeneficiary", Backbone),
    opt("subrogation", Bool),
    list("contract", Ref),
];

const PATIENT: &[El] = &[
    list("identifier", Identifier),
    opt("active", Bool),
    list("name", Obj),
    list("telecom", Obj),
    opt("gender", Code),
    opt("birthDate", Date),
    choice("deceased", &["Boolean", "DateTime"]),
    list("address", Obj),
    opt("maritalStatus", Concept),
    choice("multipleBirth", &["Boolean", "Integer"]),
    list("photo", Attachment),
    list("contact", Backbone),
    list("communication", Backbone),
    list("generalPractitioner", Ref),
    opt("managingOrganization", Ref),
    list("link", Backbone),
];

const fn spec(name: &'static str, patient: &'static str, elements: &'static [El]) -> TypeSpec {
    TypeSpec {
        name,
        patient,
        elements,
    }
}

/// The supported types, in the order of `RESOURCE_TYPES`.
const SPECS: [TypeSpec; 17] = [
    spec("AllergyIntolerance", "patient", ALLERGY_INTOLERANCE),
    spec("CarePlan", "subject", CARE_PLAN),
    spec("Condition", "subject", CONDITION),
    spec("Procedure", "subject", PROCEDURE),
    spec("DiagnosticReport", "subject", DIAGNOSTIC_REPORT),
    spec("ImagingStudy", "subject", IMAGING_STUDY),
    spec("Observation", "subject", OBSERVATION),
    spec("Specimen", "subject", SPECIMEN),
    spec("Immunization", "patient", IMMUNIZATION),
    spec("MedicationRequest", "subject", MEDICATION_REQUEST),
    spec("MedicationStatement", "subject", MEDICATION_STATEMENT),
    spec("Composition", "subject", COMPOSITION),
    spec("DocumentReference", "subject", DOCUMENT_REFERENCE),
    spec("Encounter", "subject", ENCOUNTER),
    spec("Claim", "patient", CLAIM),
    spec("Coverage", "beneficiary", COVERAGE),
    // A Patient is its own patient: the element is its id, the pseudonym.
    spec("Patient", "id", PATIENT),
];

/// The resource types records are kept as.
pub fn record_types() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|spec| spec.name)
}

fn spec_of(resource_type: &str) -> Option<&'static TypeSpec> {
    SPECS.iter().find(|spec| spec.name == resource_type)
}

// ---- checking ---------------------------------------------------------------------------

/// Parses and checks a FHIR R4 JSON resource of a supported type.
pub fn check_resource(bytes: &[u8]) -> Result<CheckedResource, FhirError> {
    if bytes.len() > RESOURCE_BYTES_MAX {
        return Err(FhirError::TooLarge { size: bytes.len() });
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(FhirError::NotUtf8 {
            offset: e.valid_up_to(),
        });
    }
    let (value, duplicate) = parse_strict(bytes)?;
    let Value::Object(object) = &value else {
        return Err(FhirError::NotAnObject);
    };
    let Some(Value::String(resource_type)) = object.get("resourceType") else {
        return Err(FhirError::MissingResourceType);
    };
    let spec = spec_of(resource_type).ok_or(FhirError::UnsupportedType)?;
    if let Some(relative) = duplicate {
        return Err(FhirError::DuplicateKey {
            path: format!("{}{relative}", spec.name),
        });
    }
    check_known_elements(spec, object)?;
    let mut path = String::from(spec.name);
    walk_object(object, Place::Resource { contained: false }, &mut path)?;
    check_elements(spec, object)?;
    check_attachment_urls(spec, object)?;
    let patient = check_patient(spec, object)?;
    let id = object.get("id").and_then(Value::as_str).map(str::to_owned);
    Ok(CheckedResource {
        resource_type: spec.name.to_owned(),
        patient,
        id,
        value,
    })
}

/// Where an object sits: at a resource's root, or as the value of an element.
#[derive(Debug, Clone, Copy)]
enum Place<'a> {
    Resource { contained: bool },
    Member(&'a str),
}

/// The general FHIR JSON rules, applied to every member of an object and below.
fn walk_object(
    object: &Map<String, Value>,
    place: Place<'_>,
    path: &mut String,
) -> Result<(), FhirError> {
    if object.is_empty() {
        return Err(FhirError::Empty { path: path.clone() });
    }
    for (key, value) in object {
        let len = path.len();
        path.push('.');
        path.push_str(key);
        walk_member(object, key, value, place, path)?;
        path.truncate(len);
    }
    Ok(())
}

fn walk_member(
    object: &Map<String, Value>,
    key: &str,
    value: &Value,
    place: Place<'_>,
    path: &mut String,
) -> Result<(), FhirError> {
    let name = key.strip_prefix('_').unwrap_or(key);
    if let Place::Member("meta") = place {
        if !META_ELEMENTS.contains(&name) {
            return Err(FhirError::UnknownElement { path: path.clone() });
        }
    }
    if key.starts_with('_') {
        return walk_primitive_extension(object, key, value, path);
    }
    match (place, key) {
        (Place::Resource { .. }, "resourceType") => return Ok(()),
        (Place::Resource { contained }, "contained") => {
            return walk_contained(value, contained, path)
        }
        (_, "extension" | "modifierExtension") => return walk_extensions(value, path),
        _ => {}
    }
    let named = named_type(place, key);
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(FhirError::Empty { path: path.clone() });
            }
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                push_index(path, index);
                match item {
                    Value::Null if parallel_entry(object, key, index) => {}
                    Value::Array(_) => {
                        return Err(wrong_type(path, "a value, not an array inside an array"))
                    }
                    _ => walk_value(item, key, named, path)?,
                }
                path.truncate(len);
            }
            Ok(())
        }
        _ => walk_value(value, key, named, path),
    }
}

/// One value (not an array) of the element `key`.
fn walk_value(
    value: &Value,
    key: &str,
    named: Option<Ty>,
    path: &mut String,
) -> Result<(), FhirError> {
    match value {
        Value::Null => Err(FhirError::Null { path: path.clone() }),
        Value::String(s) if s.is_empty() => Err(FhirError::Empty { path: path.clone() }),
        Value::Object(object) => match named {
            Some(ty) if ty.is_primitive() => Err(wrong_type(path, expected_json(ty))),
            _ => walk_object(object, Place::Member(key), path),
        },
        _ => match named {
            Some(ty) => check_value(value, ty, path),
            None => Ok(()),
        },
    }
}

/// True when `object[key][index]` may be null: the parallel array (`_key` beside `key`, or
/// `key` beside `_key`) has the same length and a value at `index`.
fn parallel_entry(object: &Map<String, Value>, key: &str, index: usize) -> bool {
    let own_len = object.get(key).and_then(Value::as_array).map(Vec::len);
    let other = match key.strip_prefix('_') {
        Some(base) => object.get(base),
        None => object.get(&format!("_{key}")),
    };
    match other.and_then(Value::as_array) {
        Some(items) => Some(items.len()) == own_len && !items[index].is_null(),
        None => false,
    }
}

/// `_name`: the id and extensions of the primitive `name` (or of each of its values).
fn walk_primitive_extension(
    object: &Map<String, Value>,
    key: &str,
    value: &Value,
    path: &mut String,
) -> Result<(), FhirError> {
    let primitive = object.get(&key[1..]);
    match value {
        Value::Null => Err(FhirError::Null { path: path.clone() }),
        Value::Object(inner) => {
            if matches!(primitive, Some(Value::Array(_) | Value::Object(_))) {
                return Err(FhirError::PrimitiveExtensionMismatch { path: path.clone() });
            }
            walk_object(inner, Place::Member(key), path)
        }
        Value::Array(items) => {
            if items.is_empty() {
                return Err(FhirError::Empty { path: path.clone() });
            }
            match primitive {
                None => {}
                Some(Value::Array(values)) if values.len() == items.len() => {}
                Some(_) => {
                    return Err(FhirError::PrimitiveExtensionMismatch { path: path.clone() })
                }
            }
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                push_index(path, index);
                match item {
                    Value::Null if parallel_entry(object, key, index) => {}
                    Value::Null => return Err(FhirError::Null { path: path.clone() }),
                    Value::Object(inner) => walk_object(inner, Place::Member(key), path)?,
                    _ => {
                        return Err(wrong_type(
                            path,
                            "an object (a primitive's id and extensions)",
                        ))
                    }
                }
                path.truncate(len);
            }
            Ok(())
        }
        _ => Err(wrong_type(
            path,
            "an object (the primitive's id and extensions)",
        )),
    }
}

/// `contained`: resources without their own contained resources, version or security.
fn walk_contained(value: &Value, in_contained: bool, path: &mut String) -> Result<(), FhirError> {
    if in_contained {
        return Err(FhirError::InvalidContained {
            path: path.clone(),
            reason: "a contained resource contains no resources (dom-2)",
        });
    }
    let Value::Array(items) = value else {
        return Err(wrong_type(path, "an array of resources"));
    };
    if items.is_empty() {
        return Err(FhirError::Empty { path: path.clone() });
    }
    for (index, item) in items.iter().enumerate() {
        let len = path.len();
        push_index(path, index);
        check_contained(item, path)?;
        path.truncate(len);
    }
    Ok(())
}

fn check_contained(item: &Value, path: &mut String) -> Result<(), FhirError> {
    let invalid = |reason| FhirError::InvalidContained {
        path: path.clone(),
        reason,
    };
    let object = match item {
        Value::Null => return Err(FhirError::Null { path: path.clone() }),
        Value::Object(object) => object,
        _ => return Err(wrong_type(path, "a resource (a JSON object)")),
    };
    match object.get("resourceType").and_then(Value::as_str) {
        Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphabetic()) => {}
        _ => return Err(invalid("it has no resourceType")),
    }
    if !object.contains_key("id") {
        return Err(invalid(
            "it has no id (contained resources are referred to as \"#<id>\")",
        ));
    }
    if let Some(meta) = object.get("meta").and_then(Value::as_object) {
        if meta.contains_key("versionId") || meta.contains_key("lastUpdated") {
            return Err(invalid(
                "it has a meta.versionId or meta.lastUpdated (dom-4)",
            ));
        }
        if meta.contains_key("security") {
            return Err(invalid("it has a security label (dom-5)"));
        }
    }
    walk_object(object, Place::Resource { contained: true }, path)
}

/// `extension`, `modifierExtension`: a url and one value or nested extensions (ext-1).
fn walk_extensions(value: &Value, path: &mut String) -> Result<(), FhirError> {
    let Value::Array(items) = value else {
        return Err(wrong_type(path, "an array of extensions"));
    };
    if items.is_empty() {
        return Err(FhirError::Empty { path: path.clone() });
    }
    for (index, item) in items.iter().enumerate() {
        let len = path.len();
        push_index(path, index);
        let extension = match item {
            Value::Null => return Err(FhirError::Null { path: path.clone() }),
            Value::Object(extension) => extension,
            _ => return Err(wrong_type(path, "an extension (a JSON object)")),
        };
        let invalid = |reason| FhirError::InvalidExtension {
            path: path.clone(),
            reason,
        };
        if !extension.contains_key("url") {
            return Err(invalid("it has no url"));
        }
        let values = extension
            .keys()
            .filter(|k| choice_suffix(k, "value").is_some())
            .count();
        if values > 1 {
            return Err(FhirError::ChoiceConflict {
                path: format!("{path}.value[x]"),
            });
        }
        match (values == 1, extension.contains_key("extension")) {
            (true, true) => return Err(invalid("it has both a value and extensions (ext-1)")),
            (false, false) => return Err(invalid("it has neither a value nor extensions (ext-1)")),
            _ => {}
        }
        walk_object(extension, Place::Member("extension"), path)?;
        path.truncate(len);
    }
    Ok(())
}

/// The R4 type of a primitive known by its name (and its parent's), wherever it occurs.
fn named_type(place: Place<'_>, key: &str) -> Option<Ty> {
    const FLAGS: &[&str] = &[
        "doNotPerform",
        "primarySource",
        "isSubpotent",
        "subrogation",
        "focal",
        "responsible",
    ];
    let parent = match place {
        Place::Resource { .. } => {
            return match key {
                "id" => Some(Id),
                "implicitRules" => Some(Uri),
                "language" => Some(Code),
                _ => named_anywhere(key, FLAGS),
            }
        }
        Place::Member(parent) => parent,
    };
    match key {
        "versionId" if parent == "meta" => Some(Id),
        "lastUpdated" if parent == "meta" => Some(Instant),
        "source" | "profile" if parent == "meta" => Some(Uri),
        "url" if parent == "extension" || parent == "modifierExtension" => Some(Uri),
        "start" | "end" if is_period(parent) => Some(DateTime),
        "value" if is_quantity(parent) => Some(Decimal),
        "comparator" if is_quantity(parent) => Some(Code),
        "system" if is_quantity(parent) || is_coding(parent) => Some(Uri),
        "code" if is_quantity(parent) || is_coding(parent) => Some(Code),
        "userSelected" if is_coding(parent) => Some(Bool),
        _ => named_anywhere(key, FLAGS),
    }
}

fn named_anywhere(key: &str, flags: &[&str]) -> Option<Ty> {
    if key == "status" || key == "contentType" {
        Some(Code)
    } else if key == "date" || key.ends_with("Date") || key.ends_with("DateTime") {
        Some(DateTime)
    } else if key.ends_with("Instant") {
        Some(Instant)
    } else if key.ends_with("Boolean") || flags.contains(&key) {
        Some(Bool)
    } else if key.ends_with("Integer") {
        Some(Int)
    } else if key.ends_with("PositiveInt") {
        Some(PosInt)
    } else if key.ends_with("UnsignedInt") {
        Some(UInt)
    } else if key.ends_with("Decimal") {
        Some(Decimal)
    } else {
        None
    }
}

fn is_period(name: &str) -> bool {
    name == "period" || name.ends_with("Period")
}

/// Quantity and the types built on it (SimpleQuantity, Age, Count, Distance, Duration),
/// and Money, by the names they go by.
fn is_quantity(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "quantity",
        "low",
        "high",
        "numerator",
        "denominator",
        "unitPrice",
        "net",
        "total",
    ];
    const SUFFIXES: &[&str] = &["Quantity", "Age", "Count", "Distance", "Duration", "Money"];
    NAMES.contains(&name) || SUFFIXES.iter().any(|s| name.ends_with(s))
}

fn is_coding(name: &str) -> bool {
    matches!(
        name,
        "coding" | "tag" | "security" | "class" | "modality" | "format"
    )
}

/// Every top-level member is an R4 element of the type (or the `_name` of a primitive one).
fn check_known_elements(spec: &TypeSpec, object: &Map<String, Value>) -> Result<(), FhirError> {
    for key in object.keys().filter(|key| *key != "resourceType") {
        let known = match key.strip_prefix('_') {
            Some(name) => element_type(spec, name).is_some_and(|(ty, _)| ty.is_primitive()),
            None => element_type(spec, key).is_some(),
        };
        if !known {
            return Err(FhirError::UnknownElement {
                path: format!("{}.{key}", spec.name),
            });
        }
    }
    Ok(())
}

/// The per-type rules for the top-level elements: shapes and types, one value per choice,
/// the required elements present.
fn check_elements(spec: &TypeSpec, object: &Map<String, Value>) -> Result<(), FhirError> {
    let at = |name: &str| format!("{}.{name}", spec.name);
    for (key, value) in object.iter().filter(|(key, _)| *key != "resourceType") {
        let (name, is_extension) = match key.strip_prefix('_') {
            Some(name) => (name, true),
            None => (key.as_str(), false),
        };
        let Some((ty, many)) = element_type(spec, name) else {
            return Err(FhirError::UnknownElement { path: at(key) });
        };
        if !is_extension {
            check_cardinality(value, ty, many, &at(key))?;
        } else if many != value.is_array() {
            return Err(FhirError::PrimitiveExtensionMismatch { path: at(key) });
        }
    }
    for element in spec.elements.iter().chain(DOMAIN_RESOURCE) {
        let is_choice = matches!(element.shape, Shape::Choice(_));
        if is_choice && values_present(element, object, true) > 1 {
            return Err(FhirError::ChoiceConflict {
                path: at(&element.display_name()),
            });
        }
        let required = element.required && element.name != spec.patient;
        if required && values_present(element, object, false) == 0 {
            return Err(FhirError::MissingElement {
                path: at(&element.display_name()),
            });
        }
    }
    Ok(())
}

/// How many of an element's variants (one for a plain element) `object` has, counting
/// `_name` siblings or not.
fn values_present(element: &El, object: &Map<String, Value>, with_extensions: bool) -> usize {
    let present = |name: &str| {
        object.contains_key(name) || (with_extensions && object.contains_key(&format!("_{name}")))
    };
    match element.shape {
        Shape::Choice(types) => types
            .iter()
            .filter(|suffix| present(&format!("{}{suffix}", element.name)))
            .count(),
        _ => usize::from(present(element.name)),
    }
}

/// The type of the top-level element `name` and whether it repeats; None if `spec`'s type
/// has no such element.
fn element_type(spec: &TypeSpec, name: &str) -> Option<(Ty, bool)> {
    DOMAIN_RESOURCE
        .iter()
        .chain(spec.elements)
        .find_map(|element| match element.shape {
            Shape::One(ty) if element.name == name => Some((ty, false)),
            Shape::Many(ty) if element.name == name => Some((ty, true)),
            Shape::Choice(types) => choice_suffix(name, element.name)
                .filter(|suffix| types.contains(suffix))
                .map(|suffix| (choice_type(suffix), false)),
            _ => None,
        })
}

/// `valueQuantity` with prefix `value` → `Quantity`.
fn choice_suffix<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
}

fn check_cardinality(value: &Value, ty: Ty, many: bool, path: &str) -> Result<(), FhirError> {
    match (value, many) {
        (Value::Array(items), true) => items
            .iter()
            .enumerate()
            .filter(|(_, item)| !item.is_null())
            .try_for_each(|(index, item)| check_value(item, ty, &format!("{path}[{index}]"))),
        (_, true) => Err(wrong_type(path, "an array (the element repeats)")),
        (Value::Array(_), false) => Err(wrong_type(path, "a single value, not an array")),
        (_, false) => check_value(value, ty, path),
    }
}

/// One value against its R4 type.
fn check_value(value: &Value, ty: Ty, path: &str) -> Result<(), FhirError> {
    let invalid = |expected| {
        Err(FhirError::InvalidValue {
            path: path.to_owned(),
            expected,
        })
    };
    match (ty, value) {
        (Bool, Value::Bool(_)) => Ok(()),
        (Decimal, Value::Number(_)) => Ok(()),
        (Int | PosInt | UInt, Value::Number(n)) => {
            let low = match ty {
                PosInt => 1,
                UInt => 0,
                _ => i32::MIN.into(),
            };
            match n.as_i64() {
                Some(n) if (low..=i32::MAX.into()).contains(&n) => Ok(()),
                _ => invalid(expected_json(ty)),
            }
        }
        (Code, Value::String(s)) if !is_code(s) => {
            invalid("a FHIR code: no leading, trailing or repeated whitespace")
        }
        (Uri, Value::String(s)) if s.chars().any(char::is_whitespace) => {
            invalid("a FHIR uri: no whitespace")
        }
        (Id, Value::String(s)) if !is_fhir_id(s) => {
            Err(FhirError::InvalidId { path: path.to_owned() })
        }
        (Date, Value::String(s)) if !is_date(s) => {
            invalid("a FHIR date: YYYY, YYYY-MM or YYYY-MM-DD")
        }
        (DateTime, Value::String(s)) if !is_date_time(s) => invalid(
            "a FHIR dateTime: YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.f] with a time zone",
        ),
        (Instant, Value::String(s)) if !is_instant(s) => {
            invalid("a FHIR instant: YYYY-MM-DDThh:mm:ss[.f] with a time zone")
        }
        (Time, Value::String(s)) if !is_time(s) => invalid("a FHIR time: hh:mm:ss[.f]"),
        (Code | Str | Uri | Id | Date | DateTime | Instant | Time, Value::String(_)) => Ok(()),
        (ty, Value::Object(_)) if !ty.is_primitive() => Ok(()),
        (ty, _) => Err(wrong_type(path, expected_json(ty))),
    }
}

fn expected_json(ty: Ty) -> &'static str {
    match ty {
        Bool => "a boolean",
        Int => "an integer (32 bits, no fraction)",
        PosInt => "a positive integer (32 bits, no fraction)",
        UInt => "a non-negative integer (32 bits, no fraction)",
        Decimal => "a number",
        Code | Str | Uri | Id | Date | DateTime | Instant | Time => "a string",
        Resource => "a resource (a JSON object)",
        _ => "a JSON object",
    }
}

/// Any `cid:` url of an attachment must name a well-formed content id.
fn check_attachment_urls(spec: &TypeSpec, object: &Map<String, Value>) -> Result<(), FhirError> {
    for (path, url) in attachment_urls(spec.name, object) {
        if let Some(cid) = url.strip_prefix("cid:") {
            if !is_valid_cid(cid) {
                return Err(FhirError::InvalidValue {
                    path,
                    expected: "\"cid:\" and a CIDv1 (raw, sha2-256, base32)",
                });
            }
        }
    }
    Ok(())
}

/// The attachment urls of a resource, with their paths, in order.
fn attachment_urls<'a>(
    resource_type: &str,
    object: &'a Map<String, Value>,
) -> Vec<(String, &'a str)> {
    let Some(place) = AttachmentPlace::of(resource_type) else {
        return Vec::new();
    };
    let Some(items) = object.get(place.list).and_then(Value::as_array) else {
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(index, item)| {
            let attachment = match place.inner {
                Some(inner) => item.get(inner)?,
                None => item,
            };
            let url = attachment.get("url")?.as_str()?;
            Some((format!("{}.url", place.path(index)), url))
        })
        .collect()
}

/// The patient's pseudonym from the type's patient reference.
fn check_patient(spec: &TypeSpec, object: &Map<String, Value>) -> Result<String, FhirError> {
    let path = format!("{}.{}", spec.name, spec.patient);
    if spec.name == "Patient" {
        return match object.get("id") {
            None => Err(FhirError::MissingPatient { path }),
            Some(id) => id
                .as_str()
                .filter(|id| is_fhir_id(id))
                .map(str::to_owned)
                .ok_or(FhirError::InvalidPatientReference { path }),
        };
    }
    let Some(reference) = object.get(spec.patient) else {
        return Err(FhirError::MissingPatient { path });
    };
    if let Some(ty) = reference.get("type") {
        if ty != "Patient" {
            return Err(FhirError::InvalidPatientReference {
                path: format!("{path}.type"),
            });
        }
    }
    reference
        .get("reference")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("Patient/"))
        .filter(|id| is_fhir_id(id))
        .map(str::to_owned)
        .ok_or(FhirError::InvalidPatientReference {
            path: format!("{path}.reference"),
        })
}

fn wrong_type(path: &str, expected: &'static str) -> FhirError {
    FhirError::WrongType {
        path: path.to_owned(),
        expected,
    }
}

fn push_index(path: &mut String, index: usize) {
    use std::fmt::Write;
    let _ = write!(path, "[{index}]");
}

// ---- primitive formats (the R4 regexes, by hand) ----------------------------------------

/// `[^\s]+(\s[^\s]+)*`
fn is_code(s: &str) -> bool {
    let mut previous_space = true;
    for c in s.chars() {
        let space = c.is_whitespace();
        if space && previous_space {
            return false;
        }
        previous_space = space;
    }
    !previous_space
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Cursor {
            bytes: s.as_bytes(),
            at: 0,
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.bytes.get(self.at) == Some(&byte);
        self.at += usize::from(found);
        found
    }

    /// Exactly `n` ASCII digits, as a number.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let digits = self.bytes.get(self.at..self.at + n)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.at += n;
        Some(
            digits
                .iter()
                .fold(0, |acc, d| acc * 10 + u32::from(d - b'0')),
        )
    }

    fn done(&self) -> bool {
        self.at == self.bytes.len()
    }
}

/// A date, month and day optional: the year (not 0000), then `-MM`, then `-DD`; returns
/// whether the day was given.
fn date(cursor: &mut Cursor<'_>) -> Option<bool> {
    let year = cursor.digits(4).filter(|&y| y > 0)?;
    if !cursor.eat(b'-') {
        return Some(false);
    }
    let month = cursor.digits(2).filter(|m| (1..=12).contains(m))?;
    if !cursor.eat(b'-') {
        return Some(false);
    }
    cursor
        .digits(2)
        .filter(|d| (1..=days_in_month(year, month)).contains(d))?;
    Some(true)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `hh:mm:ss(.f+)?`
fn time(cursor: &mut Cursor<'_>) -> bool {
    let field = |cursor: &mut Cursor<'_>, max| cursor.digits(2).is_some_and(|v| v <= max);
    if !(field(cursor, 23)
        && cursor.eat(b':')
        && field(cursor, 59)
        && cursor.eat(b':')
        && field(cursor, 60))
    {
        return false;
    }
    if cursor.eat(b'.') {
        let start = cursor.at;
        while cursor.digits(1).is_some() {}
        return cursor.at > start;
    }
    true
}

/// `Z` or `(+|-)hh:mm`, at most 14:00.
fn zone(cursor: &mut Cursor<'_>) -> bool {
    if cursor.eat(b'Z') {
        return true;
    }
    if !(cursor.eat(b'+') || cursor.eat(b'-')) {
        return false;
    }
    let (Some(hours), true, Some(minutes)) = (cursor.digits(2), cursor.eat(b':'), cursor.digits(2))
    else {
        return false;
    };
    (hours <= 13 && minutes <= 59) || (hours == 14 && minutes == 0)
}

fn is_date(s: &str) -> bool {
    let mut cursor = Cursor::new(s);
    date(&mut cursor).is_some() && cursor.done()
}

fn is_date_time(s: &str) -> bool {
    let mut cursor = Cursor::new(s);
    match date(&mut cursor) {
        Some(_) if cursor.done() => true,
        Some(true) => cursor.eat(b'T') && time(&mut cursor) && zone(&mut cursor) && cursor.done(),
        _ => false,
    }
}

fn is_instant(s: &str) -> bool {
    let mut cursor = Cursor::new(s);
    date(&mut cursor) == Some(true)
        && cursor.eat(b'T')
        && time(&mut cursor)
        && zone(&mut cursor)
        && cursor.done()
}

fn is_time(s: &str) -> bool {
    let mut cursor = Cursor::new(s);
    time(&mut cursor) && cursor.done()
}

// ---- strict parsing: serde_json's Value, refusing duplicate keys ------------------------

/// Parses JSON into a `Value`; also returns the path (below the root) of the first key that
/// occurs twice in one object, whose first value is kept.
fn parse_strict(bytes: &[u8]) -> Result<(Value, Option<String>), FhirError> {
    let state = ParseState::default();
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = Strict(&state)
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value))
        .map_err(|e| FhirError::InvalidJson {
            reason: match e.classify() {
                // serde_json's syntax messages name the problem and place, never the content.
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    e.to_string()
                }
                _ => format!("invalid data at line {}, column {}", e.line(), e.column()),
            },
        })?;
    Ok((value, state.duplicate.into_inner()))
}

#[derive(Default)]
struct ParseState {
    path: RefCell<String>,
    duplicate: RefCell<Option<String>>,
}

#[derive(Clone, Copy)]
struct Strict<'a>(&'a ParseState);

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let len = self.0.path.borrow().len();
            push_index(&mut self.0.path.borrow_mut(), items.len());
            let item = seq.next_element_seed(self)?;
            self.0.path.borrow_mut().truncate(len);
            match item {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let len = self.0.path.borrow().len();
            {
                let mut path = self.0.path.borrow_mut();
                path.push('.');
                path.push_str(&key);
            }
            let value = map.next_value_seed(self)?;
            if object.contains_key(&key) {
                let mut duplicate = self.0.duplicate.borrow_mut();
                if duplicate.is_none() {
                    *duplicate = Some(self.0.path.borrow().clone());
                }
            } else {
                object.insert(key, value);
            }
            self.0.path.borrow_mut().truncate(len);
        }
        Ok(Value::Object(object))
    }
}

// ---- version identity -------------------------------------------------------------------

/// Latest instant FHIR can write with a four-digit year: 9999-12-31T23:59:59.999Z.
const LAST_INSTANT_MS: u64 = 253_402_300_799_999;

/// Sets `id`, `meta.versionId` (the version as a string) and `meta.lastUpdated` (FHIR
/// instant, UTC, millisecond precision, e.g. "2026-11-22T10:00:00.123Z") as a FHIR server
/// does when it stores a version. Keeps other `meta` fields.
///
/// A value that is not a JSON object is left as it is (a checked resource always is one);
/// a `meta` that is not an object is replaced. Times after the year 9999 are written as its
/// last millisecond.
pub fn set_version_identity(value: &mut Value, id: &str, version: u64, last_updated_ms: u64) {
    let Value::Object(object) = value else {
        return;
    };
    object.insert("id".to_owned(), Value::String(id.to_owned()));
    let meta = object
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    if let Value::Object(meta) = meta {
        meta.insert("versionId".to_owned(), Value::String(version.to_string()));
        meta.insert(
            "lastUpdated".to_owned(),
            Value::String(format_instant(last_updated_ms)),
        );
    }
}

/// What a tombstone version seals: the type, the id and `meta` (version and time of the
/// deletion), nothing of the deleted resource. It is not a resource a client ever sees; a
/// history lists it as a DELETE entry.
pub fn tombstone(resource_type: &str, id: &str, version: u64, deleted_ms: u64) -> Value {
    serde_json::json!({
        "resourceType": resource_type,
        "id": id,
        "meta": {
            "versionId": version.to_string(),
            "lastUpdated": format_instant(deleted_ms),
        },
    })
}

/// Checks decrypted tombstone bytes: exactly `tombstone`'s shape, for this type and id.
pub fn check_tombstone(bytes: &[u8], resource_type: &str, id: &str) -> Result<Value, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|_| "the tombstone is not JSON".to_string())?;
    let object = value
        .as_object()
        .ok_or_else(|| "the tombstone is not an object".to_string())?;
    let meta = object
        .get("meta")
        .and_then(Value::as_object)
        .ok_or_else(|| "the tombstone has no meta".to_string())?;
    let fits = object.len() == 3
        && object.get("resourceType").and_then(Value::as_str) == Some(resource_type)
        && object.get("id").and_then(Value::as_str) == Some(id)
        && meta.len() == 2
        && meta.get("versionId").is_some_and(Value::is_string)
        && meta.get("lastUpdated").is_some_and(Value::is_string);
    if fits {
        Ok(value)
    } else {
        Err("the tombstone does not name exactly this record".to_string())
    }
}

/// Milliseconds since the Unix epoch as a FHIR instant in UTC with milliseconds.
pub fn format_instant(ms: u64) -> String {
    let ms = ms.min(LAST_INSTANT_MS);
    let days = ms / 86_400_000;
    let in_day = ms % 86_400_000;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (after H. Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

// ---- attachments ------------------------------------------------------------------------

/// An attachment stored separately, as the resource refers to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRef {
    pub content_type: String,
    /// "cid:<content id>" of the attachment's ciphertext.
    pub url: String,
    pub size: u64,
    /// base64 (standard, padded) SHA-1 of the plaintext, as FHIR R4 Attachment.hash defines.
    pub sha1_base64: String,
    pub title: Option<String>,
}

/// Where a resource type keeps its attachments.
struct AttachmentPlace {
    resource_type: &'static str,
    /// The repeating element.
    list: &'static str,
    /// The Attachment inside each entry, if the entry is not the Attachment itself.
    inner: Option<&'static str>,
}

impl AttachmentPlace {
    const ALL: [AttachmentPlace; 2] = [
        AttachmentPlace {
            resource_type: "DocumentReference",
            list: "content",
            inner: Some("attachment"),
        },
        AttachmentPlace {
            resource_type: "DiagnosticReport",
            list: "presentedForm",
            inner: None,
        },
    ];

    fn of(resource_type: &str) -> Option<&'static AttachmentPlace> {
        Self::ALL
            .iter()
            .find(|place| place.resource_type == resource_type)
    }

    /// The path of the Attachment at `index`.
    fn path(&self, index: usize) -> String {
        let entry = format!("{}.{}[{index}]", self.resource_type, self.list);
        match self.inner {
            Some(inner) => format!("{entry}.{inner}"),
            None => entry,
        }
    }
}

/// Appends attachments where the resource type keeps them:
/// DocumentReference.content[].attachment (one content entry each),
/// DiagnosticReport.presentedForm[]. Any other type: an error.
///
/// All or nothing: every attachment is checked (a media type, a `cid:` url with a valid
/// content id, a size R4 can state, a 20-byte base64 hash, a non-empty title) before any is
/// added. No attachments: the resource is left as it is.
pub fn add_attachments(value: &mut Value, attachments: &[AttachmentRef]) -> Result<(), FhirError> {
    let place = value
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(AttachmentPlace::of)
        .ok_or(FhirError::AttachmentsNotSupported)?;
    let Value::Object(object) = value else {
        return Err(FhirError::AttachmentsNotSupported);
    };
    let existing = match object.get(place.list) {
        None => 0,
        Some(Value::Array(items)) => items.len(),
        Some(_) => {
            return Err(wrong_type(
                &format!("{}.{}", place.resource_type, place.list),
                "an array",
            ))
        }
    };
    for (offset, attachment) in attachments.iter().enumerate() {
        check_attachment(attachment, &place.path(existing + offset))?;
    }
    if attachments.is_empty() {
        return Ok(());
    }
    let list = object
        .entry(place.list)
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(items) = list {
        for attachment in attachments {
            let json = attachment_json(attachment);
            items.push(match place.inner {
                Some(inner) => Value::Object(Map::from_iter([(inner.to_owned(), json)])),
                None => json,
            });
        }
    }
    Ok(())
}

fn check_attachment(attachment: &AttachmentRef, path: &str) -> Result<(), FhirError> {
    let invalid = |element: &str, reason| {
        Err(FhirError::InvalidAttachment {
            path: format!("{path}.{element}"),
            reason,
        })
    };
    let content_type = &attachment.content_type;
    if !is_code(content_type) || !content_type.contains('/') {
        return invalid(
            "contentType",
            "not a media type (type/subtype, a FHIR code)",
        );
    }
    if !attachment
        .url
        .strip_prefix("cid:")
        .is_some_and(is_valid_cid)
    {
        return invalid("url", "not \"cid:\" and a CIDv1 (raw, sha2-256, base32)");
    }
    if attachment.size > ATTACHMENT_SIZE_MAX {
        return invalid(
            "size",
            "larger than R4 can state (an unsignedInt, at most 2^31 - 1)",
        );
    }
    if !is_sha1_base64(&attachment.sha1_base64) {
        return invalid(
            "hash",
            "not the standard padded base64 of 20 bytes (a SHA-1)",
        );
    }
    if attachment.title.as_deref() == Some("") {
        return invalid("title", "empty (leave it out instead)");
    }
    Ok(())
}

/// 20 bytes in standard padded base64: 27 characters and `=`, with the unused low bits of
/// the last character zero.
fn is_sha1_base64(s: &str) -> bool {
    let sextet = |b: u8| match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bytes = s.as_bytes();
    bytes.len() == 28
        && bytes[27] == b'='
        && bytes[..27].iter().all(|&b| sextet(b).is_some())
        && sextet(bytes[26]).is_some_and(|v| v & 0b11 == 0)
}

fn attachment_json(attachment: &AttachmentRef) -> Value {
    let mut json = Map::new();
    json.insert(
        "contentType".to_owned(),
        attachment.content_type.clone().into(),
    );
    json.insert("url".to_owned(), attachment.url.clone().into());
    json.insert("size".to_owned(), attachment.size.into());
    json.insert("hash".to_owned(), attachment.sha1_base64.clone().into());
    if let Some(title) = &attachment.title {
        json.insert("title".to_owned(), title.clone().into());
    }
    Value::Object(json)
}

/// The content ids of attachments a resource refers to with "cid:<cid>" urls, in the places
/// above, in order.
///
/// Returned as written (for a resource that passed [`check_resource`], each is a valid
/// content id); urls that are not `cid:` urls are skipped.
pub fn attachment_cids(value: &Value) -> Vec<String> {
    let (Some(resource_type), Some(object)) = (
        value.get("resourceType").and_then(Value::as_str),
        value.as_object(),
    ) else {
        return Vec::new();
    };
    attachment_urls(resource_type, object)
        .into_iter()
        .filter_map(|(_, url)| url.strip_prefix("cid:"))
        .filter(|cid| !cid.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{
        add_attachments, attachment_cids, check_resource, format_instant, is_date, is_date_time,
        is_instant, is_time, set_version_identity, AttachmentRef, CheckedResource, FhirError,
        Shape, DOMAIN_RESOURCE, RESOURCE_BYTES_MAX, SPECS,
    };
    use medledger_core::model::RESOURCE_TYPES;
    use serde_json::Value;

    const PT: &str = "pt-0a1b2c3d4e";

    fn patient() -> Value {
        json!({ "reference": format!("Patient/{PT}") })
    }

    fn concept(code: &str) -> Value {
        json!({ "coding": [{ "system": "http://example.org/codes", "code": code }] })
    }

    fn cid(fill: char) -> String {
        format!("bafkrei{}", fill.to_string().repeat(52))
    }

    /// A minimal valid example of each supported type: its required elements and the
    /// patient reference, all synthetic.
    fn minimal(resource_type: &str) -> Value {
        let body = match resource_type {
            "AllergyIntolerance" => json!({ "patient": patient() }),
            "CarePlan" => json!({ "status": "active", "intent": "plan", "subject": patient() }),
            "Condition" => json!({ "subject": patient() }),
            "Procedure" => json!({ "status": "completed", "subject": patient() }),
            "DiagnosticReport" => {
                json!({ "status": "final", "code": concept("dr-1"), "subject": patient() })
            }
            "ImagingStudy" => json!({ "status": "available", "subject": patient() }),
            "Observation" => {
                json!({ "status": "final", "code": concept("obs-1"), "subject": patient() })
            }
            "Specimen" => json!({ "subject": patient() }),
            "Immunization" => json!({
                "status": "completed",
                "vaccineCode": concept("vac-1"),
                "patient": patient(),
                "occurrenceDateTime": "2025-03-04",
            }),
            "MedicationRequest" => json!({
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": concept("med-1"),
                "subject": patient(),
            }),
            "MedicationStatement" => json!({
                "status": "active",
                "medicationReference": { "reference": "Medication/med-1" },
                "subject": patient(),
            }),
            "Composition" => json!({
                "status": "final",
                "type": concept("doc-1"),
                "subject": patient(),
                "date": "2025-03-04T10:00:00+01:00",
                "author": [{ "reference": "Practitioner/pr-1" }],
                "title": "Synthetic summary",
            }),
            "DocumentReference" => json!({
                "status": "current",
                "subject": patient(),
                "content": [{ "attachment": { "contentType": "text/plain", "url": "https://example.org/a" } }],
            }),
            "Encounter" => json!({
                "status": "finished",
                "class": { "system": "http://example.org/act-code", "code": "AMB" },
                "subject": patient(),
            }),
            "Claim" => json!({
                "status": "active",
                "type": concept("claim-1"),
                "use": "claim",
                "patient": patient(),
                "created": "2025-03-04",
                "provider": { "reference": "Organization/org-1" },
                "priority": concept("normal"),
                "insurance": [{ "sequence": 1, "focal": true, "coverage": { "reference": "Coverage/cov-1" } }],
            }),
            "Coverage" => json!({
                "status": "active",
                "beneficiary": patient(),
                "payor": [{ "reference": "Organization/org-2" }],
            }),
            "Patient" => json!({ "id": PT }),
            other => panic!("no example for {other}"),
        };
        let mut value = body;
        value["resourceType"] = json!(resource_type);
        value
    }

    fn check(value: &Value) -> Result<CheckedResource, FhirError> {
        check_resource(&serde_json::to_vec(value).unwrap())
    }

    fn check_str(text: &str) -> Result<CheckedResource, FhirError> {
        check_resource(text.as_bytes())
    }

    fn with(mut value: Value, key: &str, member: Value) -> Value {
        value[key] = member;
        value
    }

    fn without(mut value: Value, key: &str) -> Value {
        value.as_object_mut().unwrap().remove(key);
        value
    }

    fn observation() -> Value {
        minimal("Observation")
    }

    fn path_of(error: &FhirError) -> Option<&str> {
        match error {
            FhirError::DuplicateKey { path }
            | FhirError::Null { path }
            | FhirError::Empty { path }
            | FhirError::InvalidId { path }
            | FhirError::UnknownElement { path }
            | FhirError::MissingElement { path }
            | FhirError::ChoiceConflict { path }
            | FhirError::WrongType { path, .. }
            | FhirError::InvalidValue { path, .. }
            | FhirError::PrimitiveExtensionMismatch { path }
            | FhirError::InvalidExtension { path, .. }
            | FhirError::InvalidContained { path, .. }
            | FhirError::MissingPatient { path }
            | FhirError::InvalidPatientReference { path }
            | FhirError::InvalidAttachment { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Asserts the error's variant (by a sample) and path.
    #[track_caller]
    fn assert_refused(result: Result<CheckedResource, FhirError>, variant: &str, path: &str) {
        let error = result.expect_err("should be refused");
        let name = format!("{error:?}");
        assert!(
            name.starts_with(variant),
            "expected {variant} at {path}, got {error:?}"
        );
        assert_eq!(path_of(&error), Some(path), "{error:?}");
        assert!(
            error.to_string().contains(path),
            "message names the path: {error}"
        );
    }

    // ---- the tables ---------------------------------------------------------------------

    #[test]
    fn tables_cover_exactly_the_ledger_types_in_order() {
        let tables: Vec<&str> = SPECS.iter().map(|spec| spec.name).collect();
        let ledger: Vec<&str> = RESOURCE_TYPES.iter().map(|(name, _)| *name).collect();
        assert_eq!(tables, ledger);
    }

    #[test]
    fn tables_name_each_element_once_and_the_patient_element_as_a_reference() {
        for spec in &SPECS {
            let mut names: Vec<&str> = spec
                .elements
                .iter()
                .chain(DOMAIN_RESOURCE)
                .map(|e| e.name)
                .collect();
            names.sort_unstable();
            let count = names.len();
            names.dedup();
            assert_eq!(names.len(), count, "{} names an element twice", spec.name);
            if spec.name == "Patient" {
                // Its own id names the patient.
                assert_eq!(spec.patient, "id");
                continue;
            }
            let patient = spec
                .elements
                .iter()
                .find(|e| e.name == spec.patient)
                .unwrap();
            assert!(
                matches!(patient.shape, Shape::One(super::Ty::Ref)),
                "{}",
                spec.name
            );
        }
    }

    // ---- accepted -----------------------------------------------------------------------

    #[test]
    fn every_supported_type_accepts_its_minimal_example() {
        for (resource_type, _) in RESOURCE_TYPES {
            let checked =
                check(&minimal(resource_type)).unwrap_or_else(|e| panic!("{resource_type}: {e}"));
            assert_eq!(checked.resource_type, resource_type);
            assert_eq!(checked.patient, PT);
            assert_eq!(checked.value, minimal(resource_type));
            if resource_type == "Patient" {
                assert_eq!(checked.id.as_deref(), Some(PT));
                continue;
            }
            assert_eq!(checked.id, None);
            let with_id = check(&with(minimal(resource_type), "id", json!("rec-1.a"))).unwrap();
            assert_eq!(with_id.id.as_deref(), Some("rec-1.a"));
        }
    }

    #[test]
    fn a_fuller_observation_is_accepted() {
        let resource = json!({
            "resourceType": "Observation",
            "id": "obs-7",
            "meta": {
                "versionId": "2",
                "lastUpdated": "2025-03-04T10:00:00.123Z",
                "profile": ["http://example.org/StructureDefinition/obs"],
                "tag": [{ "system": "http://example.org/tags", "code": "synthetic" }]
            },
            "language": "en",
            "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>" },
            "contained": [{ "resourceType": "Device", "id": "dev1", "status": "active" }],
            "extension": [
                { "url": "http://example.org/ext/a", "valueString": "synthetic" },
                { "url": "http://example.org/ext/b", "extension": [{ "url": "part", "valueInteger": 3 }] }
            ],
            "identifier": [{ "system": "urn:example:obs", "value": "o-1" }],
            "status": "final",
            "_status": { "extension": [{ "url": "http://example.org/ext/c", "valueCode": "x" }] },
            "category": [concept("vital-signs")],
            "code": {
                "coding": [{ "system": "http://loinc.org", "code": "8867-4", "userSelected": true }],
                "text": "Synthetic rate"
            },
            "subject": { "reference": format!("Patient/{PT}"), "type": "Patient" },
            "encounter": { "reference": "Encounter/enc-1" },
            "effectivePeriod": { "start": "2025-03-04T09:00:00Z", "end": "2025-03-04T09:05:00.5-05:00" },
            "issued": "2025-03-04T10:00:00+14:00",
            "performer": [{ "reference": "Practitioner/pr-1" }],
            "valueQuantity": { "value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" },
            "interpretation": [concept("N")],
            "note": [{ "text": "synthetic note", "time": "2025-03-04" }],
            "device": { "reference": "#dev1" },
            "referenceRange": [{ "low": { "value": 60.0 }, "high": { "value": 100 } }],
            "component": [{ "code": concept("c-1"), "valueBoolean": false }]
        });
        let checked = check(&resource).unwrap();
        assert_eq!(checked.id.as_deref(), Some("obs-7"));
        assert_eq!(checked.patient, PT);
    }

    #[test]
    fn nulls_stand_only_beside_a_parallel_extension_array() {
        let allergy = minimal("AllergyIntolerance");
        let ext = json!({ "extension": [{ "url": "http://example.org/e", "valueString": "s" }] });
        let fine = with(
            with(allergy.clone(), "category", json!(["food", null])),
            "_category",
            json!([null, ext]),
        );
        check(&fine).unwrap();
        // Both null at one index.
        let both = with(
            with(allergy.clone(), "category", json!(["food", null])),
            "_category",
            json!([null, null]),
        );
        // (Reported at `category[1]` or `_category[1]`, whichever the map yields first.)
        let error = check(&both).unwrap_err();
        assert!(
            matches!(&error, FhirError::Null { path } if path.ends_with("category[1]")),
            "{error:?}"
        );
        // No parallel array.
        let alone = with(allergy.clone(), "category", json!(["food", null]));
        assert_refused(check(&alone), "Null", "AllergyIntolerance.category[1]");
        // Lengths differ.
        let short = with(
            with(allergy.clone(), "category", json!(["food", "drug"])),
            "_category",
            json!([ext]),
        );
        assert_refused(
            check(&short),
            "PrimitiveExtensionMismatch",
            "AllergyIntolerance._category",
        );
        // An object beside an array, an array beside a single value.
        let object = with(
            with(allergy.clone(), "category", json!(["food"])),
            "_category",
            ext.clone(),
        );
        assert_refused(
            check(&object),
            "PrimitiveExtensionMismatch",
            "AllergyIntolerance._category",
        );
        let array = with(
            with(allergy, "criticality", json!("low")),
            "_criticality",
            json!([ext]),
        );
        assert_refused(
            check(&array),
            "PrimitiveExtensionMismatch",
            "AllergyIntolerance._criticality",
        );
    }

    // ---- refused: the envelope ----------------------------------------------------------

    #[test]
    fn oversize_resources_are_refused_before_parsing() {
        let text = serde_json::to_string(&observation()).unwrap();
        let padded = text.clone() + &" ".repeat(RESOURCE_BYTES_MAX - text.len());
        assert_eq!(padded.len(), RESOURCE_BYTES_MAX);
        check_str(&padded).unwrap();
        let over = format!("{padded} ");
        assert_eq!(
            check_str(&over).unwrap_err(),
            FhirError::TooLarge {
                size: RESOURCE_BYTES_MAX + 1
            }
        );
        assert_eq!(
            check_resource(&vec![b'{'; RESOURCE_BYTES_MAX * 2]).unwrap_err(),
            FhirError::TooLarge {
                size: RESOURCE_BYTES_MAX * 2
            }
        );
    }

    #[test]
    fn non_json_and_non_objects_are_refused() {
        for text in [
            "",
            "{",
            "{\"resourceType\":\"Observation\",}",
            "{} {}",
            "[1,]",
            "NaN",
        ] {
            assert!(
                matches!(check_str(text), Err(FhirError::InvalidJson { .. })),
                "{text:?}: {:?}",
                check_str(text)
            );
        }
        for text in [
            "[]",
            "[{\"resourceType\":\"Observation\"}]",
            "\"Observation\"",
            "null",
            "42",
            "true",
        ] {
            assert_eq!(
                check_str(text).unwrap_err(),
                FhirError::NotAnObject,
                "{text:?}"
            );
        }
        let mut bytes = serde_json::to_vec(&with(observation(), "issued", json!("x"))).unwrap();
        let at = bytes.iter().position(|&b| b == b'x').unwrap();
        bytes[at] = 0xff;
        assert_eq!(
            check_resource(&bytes).unwrap_err(),
            FhirError::NotUtf8 { offset: at }
        );
    }

    #[test]
    fn deep_nesting_is_refused_as_json_not_by_overflowing_the_stack() {
        let deep = format!(
            "{{\"resourceType\":\"Observation\",\"code\":{}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            check_str(&deep),
            Err(FhirError::InvalidJson { .. })
        ));
    }

    #[test]
    fn the_resource_type_must_be_a_supported_string() {
        assert_eq!(
            check(&without(observation(), "resourceType")).unwrap_err(),
            FhirError::MissingResourceType
        );
        for bad in [json!(7), json!(null), json!(["Observation"]), json!({})] {
            assert_eq!(
                check(&with(observation(), "resourceType", bad)).unwrap_err(),
                FhirError::MissingResourceType
            );
        }
        for other in [
            "Practitioner",
            "Bundle",
            "Medication",
            "observation",
            "Observation ",
            "",
        ] {
            assert_eq!(
                check(&with(observation(), "resourceType", json!(other))).unwrap_err(),
                FhirError::UnsupportedType,
                "{other:?}"
            );
        }
    }

    #[test]
    fn duplicate_keys_are_refused_wherever_they_are() {
        let two_subjects = format!(
            "{{\"resourceType\":\"Observation\",\"status\":\"final\",\"code\":{{\"text\":\"t\"}},\
             \"subject\":{{\"reference\":\"Patient/{PT}\"}},\"subject\":{{\"reference\":\"Patient/other\"}}}}"
        );
        assert_refused(
            check_str(&two_subjects),
            "DuplicateKey",
            "Observation.subject",
        );
        let nested = format!(
            "{{\"resourceType\":\"Observation\",\"status\":\"final\",\"subject\":{{\"reference\":\"Patient/{PT}\"}},\
             \"code\":{{\"coding\":[{{\"system\":\"a\",\"code\":\"b\",\"system\":\"c\"}}]}}}}"
        );
        assert_refused(
            check_str(&nested),
            "DuplicateKey",
            "Observation.code.coding[0].system",
        );
        let two_types = format!(
            "{{\"resourceType\":\"Observation\",\"resourceType\":\"Condition\",\"status\":\"final\",\
             \"code\":{{\"text\":\"t\"}},\"subject\":{{\"reference\":\"Patient/{PT}\"}}}}"
        );
        assert_refused(
            check_str(&two_types),
            "DuplicateKey",
            "Observation.resourceType",
        );
    }

    // ---- refused: general FHIR JSON rules -----------------------------------------------

    #[test]
    fn nulls_empties_and_nested_arrays_are_refused() {
        assert_refused(
            check(&with(observation(), "issued", Value::Null)),
            "Null",
            "Observation.issued",
        );
        assert_refused(
            check(&with(observation(), "code", json!({ "text": null }))),
            "Null",
            "Observation.code.text",
        );
        assert_refused(
            check(&with(observation(), "performer", json!([null]))),
            "Null",
            "Observation.performer[0]",
        );
        assert_refused(
            check(&with(observation(), "performer", json!([]))),
            "Empty",
            "Observation.performer",
        );
        assert_refused(
            check(&with(observation(), "encounter", json!({}))),
            "Empty",
            "Observation.encounter",
        );
        assert_refused(
            check(&with(observation(), "meta", json!({}))),
            "Empty",
            "Observation.meta",
        );
        assert_refused(
            check(&with(
                observation(),
                "code",
                json!({ "coding": [{ "system": "", "code": "x" }] }),
            )),
            "Empty",
            "Observation.code.coding[0].system",
        );
        assert_refused(
            check(&with(observation(), "code", json!({ "coding": [] }))),
            "Empty",
            "Observation.code.coding",
        );
        assert_refused(
            check(&with(observation(), "note", json!([[{ "text": "n" }]]))),
            "WrongType",
            "Observation.note[0]",
        );
        assert_refused(
            check(&with(observation(), "_issued", json!({}))),
            "Empty",
            "Observation._issued",
        );
        assert_refused(
            check(&with(observation(), "_issued", json!("x"))),
            "WrongType",
            "Observation._issued",
        );
    }

    #[test]
    fn ids_and_version_ids_are_fhir_ids() {
        check(&with(
            observation(),
            "id",
            json!("A-z.0".repeat(12) + "abcd"),
        ))
        .unwrap();
        for bad in ["a b", "a_b", "a/b", "Ä", &"x".repeat(65)] {
            assert_refused(
                check(&with(observation(), "id", json!(bad))),
                "InvalidId",
                "Observation.id",
            );
        }
        assert_refused(
            check(&with(observation(), "id", json!(""))),
            "Empty",
            "Observation.id",
        );
        assert_refused(
            check(&with(observation(), "id", json!(7))),
            "WrongType",
            "Observation.id",
        );
        assert_refused(
            check(&with(observation(), "meta", json!({ "versionId": "1 2" }))),
            "InvalidId",
            "Observation.meta.versionId",
        );
        assert_refused(
            check(&with(observation(), "meta", json!({ "versionID": "1" }))),
            "UnknownElement",
            "Observation.meta.versionID",
        );
        assert_refused(
            check(&with(
                observation(),
                "meta",
                json!({ "lastUpdated": "2025-03-04" }),
            )),
            "InvalidValue",
            "Observation.meta.lastUpdated",
        );
    }

    #[test]
    fn codes_uris_and_dates_are_checked_where_they_are_known() {
        for bad in [" final", "final ", "fi  nal", "fi\tnal\n"] {
            assert_refused(
                check(&with(observation(), "status", json!(bad))),
                "InvalidValue",
                "Observation.status",
            );
        }
        assert_refused(
            check(&with(observation(), "status", json!(1))),
            "WrongType",
            "Observation.status",
        );
        assert_refused(
            check(&with(observation(), "status", json!({ "code": "final" }))),
            "WrongType",
            "Observation.status",
        );
        let coding =
            |system: &str, code: &str| json!({ "coding": [{ "system": system, "code": code }] });
        assert_refused(
            check(&with(
                observation(),
                "code",
                coding("http://example.org/a b", "x"),
            )),
            "InvalidValue",
            "Observation.code.coding[0].system",
        );
        assert_refused(
            check(&with(
                observation(),
                "code",
                coding("http://example.org", "x "),
            )),
            "InvalidValue",
            "Observation.code.coding[0].code",
        );
        assert_refused(
            check(&with(
                observation(),
                "category",
                json!([{ "coding": [{ "code": "a", "userSelected": "yes" }] }]),
            )),
            "WrongType",
            "Observation.category[0].coding[0].userSelected",
        );
        let cases = [
            (
                "effectiveDateTime",
                "2025-13-01",
                "Observation.effectiveDateTime",
            ),
            (
                "effectiveDateTime",
                "2025-03-04T10:00Z",
                "Observation.effectiveDateTime",
            ),
            (
                "effectiveDateTime",
                "2025-03-04T10:00:00",
                "Observation.effectiveDateTime",
            ),
            (
                "effectiveDateTime",
                "2023-02-29",
                "Observation.effectiveDateTime",
            ),
            (
                "effectiveInstant",
                "2025-03-04",
                "Observation.effectiveInstant",
            ),
            ("issued", "2025-03-04", "Observation.issued"),
            ("issued", "2025-03-04T10:00:00+14:30", "Observation.issued"),
        ];
        for (key, bad, path) in cases {
            assert_refused(
                check(&with(observation(), key, json!(bad))),
                "InvalidValue",
                path,
            );
        }
        check(&with(
            observation(),
            "effectiveDateTime",
            json!("2024-02-29"),
        ))
        .unwrap();
        assert_refused(
            check(&with(
                observation(),
                "effectivePeriod",
                json!({ "start": "yesterday" }),
            )),
            "InvalidValue",
            "Observation.effectivePeriod.start",
        );
        assert_refused(
            check(&with(
                minimal("Encounter"),
                "period",
                json!({ "end": "2025-02-30" }),
            )),
            "InvalidValue",
            "Encounter.period.end",
        );
        assert_refused(
            check(&with(
                minimal("Condition"),
                "onsetDateTime",
                json!("2025/01/01"),
            )),
            "InvalidValue",
            "Condition.onsetDateTime",
        );
        assert_refused(
            check(&with(
                minimal("Condition"),
                "recordedDate",
                json!("0000-01-01"),
            )),
            "InvalidValue",
            "Condition.recordedDate",
        );
        assert_refused(
            check(&with(
                minimal("MedicationRequest"),
                "authoredOn",
                json!("2025-03-04T25:00:00Z"),
            )),
            "InvalidValue",
            "MedicationRequest.authoredOn",
        );
        assert_refused(
            check(&with(
                minimal("Immunization"),
                "expirationDate",
                json!("2025-03-04T10:00:00Z"),
            )),
            "InvalidValue",
            "Immunization.expirationDate",
        );
        assert_refused(
            check(&with(
                minimal("DocumentReference"),
                "date",
                json!("2025-03"),
            )),
            "InvalidValue",
            "DocumentReference.date",
        );
        assert_refused(
            check(&with(
                minimal("Claim"),
                "item",
                json!([{ "sequence": 1, "productOrService": concept("p"), "servicedDate": "March" }]),
            )),
            "InvalidValue",
            "Claim.item[0].servicedDate",
        );
        assert_refused(
            check(&with(observation(), "language", json!("en "))),
            "InvalidValue",
            "Observation.language",
        );
    }

    #[test]
    fn date_and_time_matchers_follow_the_r4_regexes() {
        for ok in [
            "2025",
            "2025-03",
            "2025-03-04",
            "2025-03-04T10:00:00Z",
            "2025-03-04T23:59:60.123456+14:00",
            "2025-03-04T00:00:00-13:59",
            "0001",
        ] {
            assert!(is_date_time(ok), "{ok}");
        }
        for bad in [
            "",
            "25",
            "02025",
            "0000",
            "2025-3",
            "2025-00",
            "2025-03-32",
            "2025-04-31",
            "2025-03T10:00:00Z",
            "2025-03-04T",
            "2025-03-04T10:00:00.Z",
            "2025-03-04T10:00:00+1400",
            "2025-03-04T10:00:00+14:01",
            "2025-03-04T24:00:00Z",
            "2025-03-04t10:00:00Z",
            "2025-03-04 10:00:00Z",
            " 2025",
        ] {
            assert!(!is_date_time(bad), "{bad}");
        }
        assert!(is_date("2025-03-04") && is_date("2025") && !is_date("2025-03-04T10:00:00Z"));
        assert!(is_date("2000-02-29") && !is_date("1900-02-29") && is_date("2024-02-29"));
        assert!(is_instant("2025-03-04T10:00:00Z") && is_instant("2025-03-04T10:00:00.1+01:00"));
        assert!(!is_instant("2025-03-04") && !is_instant("2025-03-04T10:00:00"));
        assert!(
            is_time("10:00:00")
                && is_time("23:59:59.999")
                && !is_time("10:00")
                && !is_time("10:00:00Z")
        );
    }

    #[test]
    fn booleans_numbers_and_integers_have_their_json_types() {
        assert_refused(
            check(&with(
                minimal("Immunization"),
                "primarySource",
                json!("true"),
            )),
            "WrongType",
            "Immunization.primarySource",
        );
        assert_refused(
            check(&with(observation(), "valueBoolean", json!(1))),
            "WrongType",
            "Observation.valueBoolean",
        );
        assert_refused(
            check(&with(
                observation(),
                "valueQuantity",
                json!({ "value": "72" }),
            )),
            "WrongType",
            "Observation.valueQuantity.value",
        );
        assert_refused(
            check(&with(
                minimal("Immunization"),
                "doseQuantity",
                json!({ "value": "0.5", "unit": "mL" }),
            )),
            "WrongType",
            "Immunization.doseQuantity.value",
        );
        assert_refused(
            check(&with(
                observation(),
                "referenceRange",
                json!([{ "low": { "value": true } }]),
            )),
            "WrongType",
            "Observation.referenceRange[0].low.value",
        );
        assert_refused(
            check(&with(observation(), "valueInteger", json!(1.5))),
            "InvalidValue",
            "Observation.valueInteger",
        );
        assert_refused(
            check(&with(observation(), "valueInteger", json!(1_i64 << 40))),
            "InvalidValue",
            "Observation.valueInteger",
        );
        for bad in [json!(0), json!(-1), json!(2.0)] {
            assert_refused(
                check(&with(minimal("Coverage"), "order", bad)),
                "InvalidValue",
                "Coverage.order",
            );
        }
        assert_refused(
            check(&with(minimal("Coverage"), "order", json!("1"))),
            "WrongType",
            "Coverage.order",
        );
        assert_refused(
            check(&with(minimal("ImagingStudy"), "numberOfSeries", json!(-1))),
            "InvalidValue",
            "ImagingStudy.numberOfSeries",
        );
        check(&with(minimal("ImagingStudy"), "numberOfSeries", json!(0))).unwrap();
        assert_refused(
            check(&with(
                minimal("Claim"),
                "insurance",
                json!([{ "sequence": 1, "focal": "yes", "coverage": { "reference": "Coverage/c" } }]),
            )),
            "WrongType",
            "Claim.insurance[0].focal",
        );
    }

    // ---- refused: per type --------------------------------------------------------------

    #[test]
    fn unknown_and_misspelt_elements_are_refused_for_every_type() {
        for (resource_type, _) in RESOURCE_TYPES {
            for unknown in [
                "foo",
                "Status",
                "subjct",
                "identifiers",
                "_foo",
                "resourcetype",
            ] {
                assert_refused(
                    check(&with(minimal(resource_type), unknown, json!("x"))),
                    "UnknownElement",
                    &format!("{resource_type}.{unknown}"),
                );
            }
        }
        let cases = [
            ("Observation", "stauts"),
            ("Observation", "valueFoo"),
            ("Observation", "valuequantity"),
            ("Observation", "effectiveString"),
            ("Observation", "value"),
            ("Observation", "_code"),
            ("Observation", "_subject"),
            ("Condition", "onsetBoolean"),
            ("Immunization", "occurrencePeriod"),
            ("Encounter", "classs"),
            ("Coverage", "patient"),
            ("Claim", "subject"),
        ];
        for (resource_type, unknown) in cases {
            assert_refused(
                check(&with(
                    minimal(resource_type),
                    unknown,
                    json!({ "text": "x" }),
                )),
                "UnknownElement",
                &format!("{resource_type}.{unknown}"),
            );
        }
    }

    #[test]
    fn required_elements_are_required_for_every_type() {
        for spec in &SPECS {
            for element in spec
                .elements
                .iter()
                .filter(|e| e.required && e.name != spec.patient)
            {
                let mut resource = minimal(spec.name);
                let object = resource.as_object_mut().unwrap();
                let before = object.len();
                object.retain(|key, _| match element.shape {
                    Shape::Choice(_) => super::choice_suffix(key, element.name).is_none(),
                    _ => key != element.name,
                });
                assert_eq!(
                    object.len(),
                    before - 1,
                    "the example of {} has {}",
                    spec.name,
                    element.name
                );
                let name = match element.shape {
                    Shape::Choice(_) => format!("{}[x]", element.name),
                    _ => element.name.to_owned(),
                };
                assert_refused(
                    check(&resource),
                    "MissingElement",
                    &format!("{}.{name}", spec.name),
                );
            }
        }
        // The listed ones, by name.
        let listed = [
            ("Observation", "status"),
            ("Observation", "code"),
            ("Encounter", "status"),
            ("Encounter", "class"),
            ("MedicationRequest", "intent"),
            ("Immunization", "vaccineCode"),
            ("DocumentReference", "content"),
            ("DiagnosticReport", "code"),
            ("Claim", "insurance"),
            ("Coverage", "payor"),
            ("Composition", "author"),
        ];
        for (resource_type, element) in listed {
            assert_refused(
                check(&without(minimal(resource_type), element)),
                "MissingElement",
                &format!("{resource_type}.{element}"),
            );
        }
        let medication = without(minimal("MedicationRequest"), "medicationCodeableConcept");
        assert_refused(
            check(&medication),
            "MissingElement",
            "MedicationRequest.medication[x]",
        );
        // An extension alone is no value.
        let ext =
            json!({ "extension": [{ "url": "http://example.org/e", "valueCode": "unknown" }] });
        let only_extension = with(without(observation(), "status"), "_status", ext);
        assert_refused(
            check(&only_extension),
            "MissingElement",
            "Observation.status",
        );
    }

    #[test]
    fn a_choice_takes_one_type() {
        let two = with(
            with(observation(), "valueQuantity", json!({ "value": 1 })),
            "valueString",
            json!("one"),
        );
        assert_refused(check(&two), "ChoiceConflict", "Observation.value[x]");
        let with_extension = with(
            with(observation(), "valueString", json!("one")),
            "_valueBoolean",
            json!({ "extension": [{ "url": "http://example.org/e", "valueCode": "x" }] }),
        );
        assert_refused(
            check(&with_extension),
            "ChoiceConflict",
            "Observation.value[x]",
        );
        let occurrence = with(
            minimal("Immunization"),
            "occurrenceString",
            json!("last spring"),
        );
        assert_refused(
            check(&occurrence),
            "ChoiceConflict",
            "Immunization.occurrence[x]",
        );
        let medication = with(
            minimal("MedicationRequest"),
            "medicationReference",
            json!({ "reference": "Medication/m" }),
        );
        assert_refused(
            check(&medication),
            "ChoiceConflict",
            "MedicationRequest.medication[x]",
        );
        let onset = with(
            with(minimal("Condition"), "onsetAge", json!({ "value": 40 })),
            "onsetString",
            json!("childhood"),
        );
        assert_refused(check(&onset), "ChoiceConflict", "Condition.onset[x]");
        // One of each of two choices is fine.
        let fine = with(
            with(minimal("Condition"), "onsetString", json!("childhood")),
            "abatementDateTime",
            json!("2020"),
        );
        check(&fine).unwrap();
        // Its value's type follows the suffix.
        assert_refused(
            check(&with(observation(), "valueString", json!({ "text": "x" }))),
            "WrongType",
            "Observation.valueString",
        );
        assert_refused(
            check(&with(observation(), "valueCodeableConcept", json!("x"))),
            "WrongType",
            "Observation.valueCodeableConcept",
        );
    }

    #[test]
    fn repeating_elements_are_arrays_and_others_are_not() {
        assert_refused(
            check(&with(observation(), "category", concept("x"))),
            "WrongType",
            "Observation.category",
        );
        assert_refused(
            check(&with(observation(), "code", json!([concept("x")]))),
            "WrongType",
            "Observation.code",
        );
        assert_refused(
            check(&with(
                minimal("Composition"),
                "author",
                json!({ "reference": "Practitioner/p" }),
            )),
            "WrongType",
            "Composition.author",
        );
        assert_refused(
            check(&with(observation(), "subject", json!([patient()]))),
            "WrongType",
            "Observation.subject",
        );
        assert_refused(
            check(&with(observation(), "code", json!("x"))),
            "WrongType",
            "Observation.code",
        );
        assert_refused(
            check(&with(
                minimal("AllergyIntolerance"),
                "category",
                json!([{ "code": "food" }]),
            )),
            "WrongType",
            "AllergyIntolerance.category[0]",
        );
    }

    // ---- the patient --------------------------------------------------------------------

    #[test]
    fn the_patient_reference_is_required_for_every_type() {
        for spec in &SPECS {
            assert_refused(
                check(&without(minimal(spec.name), spec.patient)),
                "MissingPatient",
                &format!("{}.{}", spec.name, spec.patient),
            );
        }
    }

    #[test]
    fn the_patient_reference_is_a_relative_patient_reference() {
        for reference in [
            "Patient/",
            "Group/x",
            "Practitioner/x",
            "https://example.org/fhir/Patient/x",
            "Patient/x/_history/1",
            "patient/x",
            " Patient/x",
            "Patient/a b",
            "Patient/a_b",
            "#p1",
            "Patient",
        ] {
            for (resource_type, element) in [
                ("Observation", "subject"),
                ("Coverage", "beneficiary"),
                ("Claim", "patient"),
            ] {
                let resource = with(
                    minimal(resource_type),
                    element,
                    json!({ "reference": reference }),
                );
                assert_refused(
                    check(&resource),
                    "InvalidPatientReference",
                    &format!("{resource_type}.{element}.reference"),
                );
            }
        }
        let display_only = with(observation(), "subject", json!({ "display": "someone" }));
        assert_refused(
            check(&display_only),
            "InvalidPatientReference",
            "Observation.subject.reference",
        );
        let identifier_only = with(
            observation(),
            "subject",
            json!({ "identifier": { "value": "x" } }),
        );
        assert_refused(
            check(&identifier_only),
            "InvalidPatientReference",
            "Observation.subject.reference",
        );
        let group = with(
            observation(),
            "subject",
            json!({ "reference": format!("Patient/{PT}"), "type": "Group" }),
        );
        assert_refused(
            check(&group),
            "InvalidPatientReference",
            "Observation.subject.type",
        );
        assert_refused(
            check(&with(
                observation(),
                "subject",
                json!(format!("Patient/{PT}")),
            )),
            "WrongType",
            "Observation.subject",
        );
        assert_refused(
            check(&with(observation(), "subject", json!({ "reference": 5 }))),
            "InvalidPatientReference",
            "Observation.subject.reference",
        );
    }

    // ---- extensions and contained resources ---------------------------------------------

    #[test]
    fn extensions_have_a_url_and_one_value_or_extensions() {
        let ext = |e: Value| with(observation(), "extension", json!([e]));
        assert_refused(
            check(&ext(json!({ "valueString": "x" }))),
            "InvalidExtension",
            "Observation.extension[0]",
        );
        assert_refused(
            check(&ext(json!({ "url": "http://example.org/e" }))),
            "InvalidExtension",
            "Observation.extension[0]",
        );
        assert_refused(
            check(&ext(json!({
                "url": "http://example.org/e",
                "valueString": "x",
                "extension": [{ "url": "a", "valueString": "y" }]
            }))),
            "InvalidExtension",
            "Observation.extension[0]",
        );
        assert_refused(
            check(&ext(
                json!({ "url": "http://example.org/e", "valueString": "x", "valueInteger": 1 }),
            )),
            "ChoiceConflict",
            "Observation.extension[0].value[x]",
        );
        assert_refused(
            check(&ext(
                json!({ "url": "http://example.org/a b", "valueString": "x" }),
            )),
            "InvalidValue",
            "Observation.extension[0].url",
        );
        assert_refused(
            check(&with(
                observation(),
                "code",
                json!({ "text": "t", "extension": { "url": "u", "valueString": "x" } }),
            )),
            "WrongType",
            "Observation.code.extension",
        );
        assert_refused(
            check(&with(
                observation(),
                "modifierExtension",
                json!([{ "url": "http://example.org/e", "extension": [{ "url": "a" }] }]),
            )),
            "InvalidExtension",
            "Observation.modifierExtension[0].extension[0]",
        );
    }

    #[test]
    fn contained_resources_follow_the_domain_resource_rules() {
        let contained = |c: Value| with(observation(), "contained", json!([c]));
        check(&contained(
            json!({ "resourceType": "Medication", "id": "m1", "status": "active" }),
        ))
        .unwrap();
        assert_refused(
            check(&contained(
                json!({ "resourceType": "Medication", "status": "active" }),
            )),
            "InvalidContained",
            "Observation.contained[0]",
        );
        assert_refused(
            check(&contained(json!({ "id": "m1", "status": "active" }))),
            "InvalidContained",
            "Observation.contained[0]",
        );
        assert_refused(
            check(&contained(
                json!({ "resourceType": "Medication", "id": "m 1" }),
            )),
            "InvalidId",
            "Observation.contained[0].id",
        );
        assert_refused(
            check(&contained(
                json!({ "resourceType": "Medication", "id": "m1", "meta": { "versionId": "1" } }),
            )),
            "InvalidContained",
            "Observation.contained[0]",
        );
        assert_refused(
            check(&contained(json!({
                "resourceType": "Medication",
                "id": "m1",
                "meta": { "security": [{ "code": "R" }] }
            }))),
            "InvalidContained",
            "Observation.contained[0]",
        );
        assert_refused(
            check(&contained(json!({
                "resourceType": "Medication",
                "id": "m1",
                "contained": [{ "resourceType": "Substance", "id": "s1" }]
            }))),
            "InvalidContained",
            "Observation.contained[0].contained",
        );
        assert_refused(
            check(&contained(
                json!({ "resourceType": "Medication", "id": "m1", "status": "" }),
            )),
            "Empty",
            "Observation.contained[0].status",
        );
        assert_refused(
            check(&contained(json!("Medication/m1"))),
            "WrongType",
            "Observation.contained[0]",
        );
        assert_refused(
            check(&with(
                observation(),
                "contained",
                json!({ "resourceType": "Medication", "id": "m1" }),
            )),
            "WrongType",
            "Observation.contained",
        );
    }

    // ---- errors carry no content --------------------------------------------------------

    #[test]
    fn error_messages_name_the_path_but_no_content() {
        const MARK: &str = "SYNTHETICMARK";
        let cases = [
            with(observation(), "status", json!(format!(" {MARK}"))),
            with(observation(), "effectiveDateTime", json!(MARK)),
            with(
                observation(),
                "subject",
                json!({ "reference": format!("Group/{MARK}") }),
            ),
            with(observation(), "resourceType", json!(MARK)),
            with(observation(), "id", json!(format!("{MARK} x"))),
            with(observation(), "valueQuantity", json!({ "value": MARK })),
            with(
                observation(),
                "code",
                json!({ "coding": [{ "system": format!("{MARK} x") }] }),
            ),
        ];
        for resource in cases {
            let message = check(&resource).unwrap_err().to_string();
            assert!(!message.contains(MARK), "{message}");
        }
        let broken =
            format!("{{\"resourceType\":\"Observation\",\"note\":[{{\"text\":\"{MARK}\"}} ");
        let message = check_str(&broken).unwrap_err().to_string();
        assert!(!message.contains(MARK), "{message}");
        let message = check_str(&format!("{{\"{MARK}\": tru}}"))
            .unwrap_err()
            .to_string();
        assert!(!message.contains(MARK), "{message}");
    }

    // ---- version identity ---------------------------------------------------------------

    #[test]
    fn instants_are_utc_with_milliseconds() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_instant(1_795_341_600_123),
            "2026-11-22T10:00:00.123Z"
        );
        assert_eq!(
            format_instant(1_709_251_199_999),
            "2024-02-29T23:59:59.999Z"
        );
        assert_eq!(format_instant(951_868_800_000), "2000-03-01T00:00:00.000Z");
        assert_eq!(format_instant(u64::MAX), "9999-12-31T23:59:59.999Z");
        for ms in [
            0,
            1,
            86_399_999,
            951_782_400_000,
            1_795_341_600_123,
            u64::MAX,
        ] {
            assert!(is_instant(&format_instant(ms)), "{ms}");
        }
    }

    #[test]
    fn set_version_identity_sets_id_version_and_time_and_keeps_other_meta() {
        let mut value = with(
            with(observation(), "id", json!("old")),
            "meta",
            json!({
                "versionId": "1",
                "lastUpdated": "2020-01-01T00:00:00Z",
                "source": "urn:example:source",
                "profile": ["http://example.org/p"],
                "tag": [{ "code": "t" }]
            }),
        );
        set_version_identity(&mut value, "obs-9", 3, 1_795_341_600_123);
        assert_eq!(value["id"], "obs-9");
        assert_eq!(
            value["meta"],
            json!({
                "versionId": "3",
                "lastUpdated": "2026-11-22T10:00:00.123Z",
                "source": "urn:example:source",
                "profile": ["http://example.org/p"],
                "tag": [{ "code": "t" }]
            })
        );
        let checked = check(&value).unwrap();
        assert_eq!(checked.id.as_deref(), Some("obs-9"));

        let mut bare = observation();
        set_version_identity(&mut bare, "obs-1", 1, 0);
        assert_eq!(
            bare["meta"],
            json!({ "versionId": "1", "lastUpdated": "1970-01-01T00:00:00.000Z" })
        );
        check(&bare).unwrap();

        let mut not_an_object = json!([1]);
        set_version_identity(&mut not_an_object, "x", 1, 0);
        assert_eq!(not_an_object, json!([1]));
    }

    // ---- attachments --------------------------------------------------------------------

    /// SHA-1 of the empty string.
    const SHA1_EMPTY: &str = "2jmj7l5rSw0yVb/vlWAYkK/YBwk=";

    fn attachment(fill: char, title: Option<&str>) -> AttachmentRef {
        AttachmentRef {
            content_type: "application/pdf".to_owned(),
            url: format!("cid:{}", cid(fill)),
            size: 1234,
            sha1_base64: SHA1_EMPTY.to_owned(),
            title: title.map(str::to_owned),
        }
    }

    #[test]
    fn document_reference_attachments_round_trip() {
        let mut value = check(&minimal("DocumentReference")).unwrap().value;
        assert!(attachment_cids(&value).is_empty());
        add_attachments(
            &mut value,
            &[
                attachment('a', Some("Synthetic report")),
                attachment('b', None),
            ],
        )
        .unwrap();
        assert_eq!(attachment_cids(&value), vec![cid('a'), cid('b')]);
        let content = value["content"].as_array().unwrap();
        assert_eq!(content.len(), 3);
        assert_eq!(content[0]["attachment"]["url"], "https://example.org/a");
        assert_eq!(
            content[1],
            json!({ "attachment": {
                "contentType": "application/pdf",
                "url": format!("cid:{}", cid('a')),
                "size": 1234,
                "hash": SHA1_EMPTY,
                "title": "Synthetic report"
            }})
        );
        assert!(content[2]["attachment"].get("title").is_none());
        set_version_identity(&mut value, "doc-1", 1, 1_795_341_600_123);
        let checked = check(&value).unwrap();
        assert_eq!(attachment_cids(&checked.value), vec![cid('a'), cid('b')]);
    }

    #[test]
    fn diagnostic_report_attachments_round_trip() {
        let mut value = check(&minimal("DiagnosticReport")).unwrap().value;
        add_attachments(&mut value, &[]).unwrap();
        assert!(value.get("presentedForm").is_none(), "no empty array");
        add_attachments(&mut value, &[attachment('c', None)]).unwrap();
        add_attachments(
            &mut value,
            &[attachment('d', Some("t")), attachment('e', None)],
        )
        .unwrap();
        assert_eq!(attachment_cids(&value), vec![cid('c'), cid('d'), cid('e')]);
        assert_eq!(
            value["presentedForm"][0]["url"],
            format!("cid:{}", cid('c'))
        );
        check(&value).unwrap();
    }

    #[test]
    fn other_types_keep_no_attachments() {
        for (resource_type, _) in RESOURCE_TYPES {
            if resource_type == "DocumentReference" || resource_type == "DiagnosticReport" {
                continue;
            }
            let mut value = minimal(resource_type);
            assert_eq!(
                add_attachments(&mut value, &[attachment('a', None)]),
                Err(FhirError::AttachmentsNotSupported)
            );
            assert_eq!(value, minimal(resource_type));
            assert!(attachment_cids(&value).is_empty());
        }
        assert_eq!(
            add_attachments(&mut json!([]), &[attachment('a', None)]),
            Err(FhirError::AttachmentsNotSupported)
        );
        assert!(attachment_cids(&json!("DocumentReference")).is_empty());
    }

    #[test]
    fn invalid_attachments_are_refused_and_nothing_is_added() {
        type Spoil = fn(&mut AttachmentRef);
        let cases: [(Spoil, &str); 8] = [
            (|a| a.url = "cid:abc".to_owned(), "url"),
            (
                |a| a.url = format!("https://example.org/{}", cid('a')),
                "url",
            ),
            (|a| a.size = 1 << 31, "size"),
            (
                |a| a.sha1_base64 = "2jmj7l5rSw0yVb/vlWAYkK/YBwk".to_owned(),
                "hash",
            ),
            (
                |a| a.sha1_base64 = "2jmj7l5rSw0yVb/vlWAYkK/YBwl=".to_owned(),
                "hash",
            ),
            (
                |a| a.content_type = "application pdf".to_owned(),
                "contentType",
            ),
            (
                |a| a.content_type = " application/pdf".to_owned(),
                "contentType",
            ),
            (|a| a.title = Some(String::new()), "title"),
        ];
        for (spoil, element) in cases {
            let mut bad = attachment('b', None);
            spoil(&mut bad);
            let mut value = minimal("DocumentReference");
            let error = add_attachments(&mut value, &[attachment('a', None), bad]).unwrap_err();
            assert_eq!(
                path_of(&error),
                Some(format!("DocumentReference.content[2].attachment.{element}").as_str()),
                "{error:?}"
            );
            assert!(matches!(error, FhirError::InvalidAttachment { .. }));
            assert_eq!(value, minimal("DocumentReference"), "all or nothing");
        }
        let mut size_max = attachment('a', None);
        size_max.size = (1 << 31) - 1;
        add_attachments(&mut minimal("DiagnosticReport"), &[size_max]).unwrap();
        let mut broken = with(
            minimal("DiagnosticReport"),
            "presentedForm",
            json!({ "url": "x" }),
        );
        assert!(matches!(
            add_attachments(&mut broken, &[attachment('a', None)]),
            Err(FhirError::WrongType { .. })
        ));
    }

    #[test]
    fn cid_urls_in_resources_must_name_valid_content_ids() {
        let report = with(
            minimal("DiagnosticReport"),
            "presentedForm",
            json!([{ "contentType": "application/pdf", "url": "cid:../../etc/passwd" }]),
        );
        assert_refused(
            check(&report),
            "InvalidValue",
            "DiagnosticReport.presentedForm[0].url",
        );
        let document = with(
            minimal("DocumentReference"),
            "content",
            json!([{ "attachment": { "url": format!("cid:{}", cid('a')) } }, { "attachment": { "url": "cid:" } }]),
        );
        assert_refused(
            check(&document),
            "InvalidValue",
            "DocumentReference.content[1].attachment.url",
        );
    }

    #[test]
    fn a_tombstone_checks_only_for_its_own_record_and_shape() {
        // Proves that a reader accepts a decrypted tombstone only when it is exactly the
        // stub for the indexed type and id: not another record's, not another type's, not
        // one carrying anything of a resource, and not something that is no object at all.
        let stub = crate::fhir::tombstone("Observation", "hospital-a.1", 3, 1_700_000_000_000);
        let bytes = serde_json::to_vec(&stub).unwrap();
        assert_eq!(
            crate::fhir::check_tombstone(&bytes, "Observation", "hospital-a.1"),
            Ok(stub.clone())
        );
        assert_eq!(stub["meta"]["versionId"], "3");
        assert!(crate::fhir::check_tombstone(&bytes, "Observation", "hospital-a.2").is_err());
        assert!(crate::fhir::check_tombstone(&bytes, "Condition", "hospital-a.1").is_err());
        let mut extra = stub.clone();
        extra["status"] = json!("final");
        let extra = serde_json::to_vec(&extra).unwrap();
        assert!(crate::fhir::check_tombstone(&extra, "Observation", "hospital-a.1").is_err());
        let mut no_meta = stub.clone();
        no_meta.as_object_mut().unwrap().remove("meta");
        let no_meta = serde_json::to_vec(&no_meta).unwrap();
        assert!(crate::fhir::check_tombstone(&no_meta, "Observation", "hospital-a.1").is_err());
        assert!(crate::fhir::check_tombstone(b"[1]", "Observation", "hospital-a.1").is_err());
        assert!(crate::fhir::check_tombstone(b"\xff", "Observation", "hospital-a.1").is_err());
    }
}
