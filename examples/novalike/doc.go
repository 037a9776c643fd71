// Package novalike is an example OpenStack-style service that embeds a
// phasecast agent. It keeps an "instances" table whose name and
// display_name columns are being replaced by common_name, and runs workers
// that read and write it using only the agent's column lists, each query
// inside a guard. It shows how a real service honours removed() directives,
// and the demo, the benchmarks and the integration tests drive it.
//
// The service's model knows every column it has ever had ("the multi-schema
// version of the model"); the agent's snapshot says which of them are still
// in use. A service built for release L lists "L" in Config.Releases.
package novalike
