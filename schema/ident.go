package schema

import (
	"errors"
	"strings"
	"unicode"
	"unicode/utf8"
)

// maxIdentifierBytes is PostgreSQL's NAMEDATALEN - 1.
const maxIdentifierBytes = 63

// ValidateIdentifier accepts the identifiers phasecast will quote and use:
// mixed case, spaces and non-ASCII letters are fine; empty names, names
// over 63 bytes, control characters, double quotes and surrounding spaces
// are refused, because each is far likelier a mistake or an attack than a
// real table or column name.
func ValidateIdentifier(name string) error {
	switch {
	case name == "":
		return errors.New("identifier is empty")
	case len(name) > maxIdentifierBytes:
		return errors.New("identifier is longer than 63 bytes")
	case !utf8.ValidString(name):
		return errors.New("identifier is not valid UTF-8")
	case strings.ContainsRune(name, '"'):
		return errors.New("identifier contains a double quote")
	case strings.TrimSpace(name) != name:
		return errors.New("identifier has leading or trailing spaces")
	}
	for _, r := range name {
		if unicode.IsControl(r) {
			return errors.New("identifier contains a control character")
		}
	}
	return nil
}
