// Package phase holds the release phase model: the five phases, the moves
// allowed between them, and which phases hide a release's removed columns.
// It is shared by the store, the wire protocol and the agent so that there is
// exactly one copy of the rules.
package phase
