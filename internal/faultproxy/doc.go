// Package faultproxy is a TCP proxy that fault tests put between a client
// (an agent, a broadcaster) and a real server (RabbitMQ, PostgreSQL) to
// break the connection in the ways a network does:
//
//   - Cut closes every current connection on both sides at once, as a
//     broker restart or a connection reset does. New connections are still
//     accepted, so a client's reconnect loop succeeds.
//   - Blackhole holds every byte in both directions and closes nothing, as
//     a partition does: each peer sees silence until its heartbeat or a
//     timeout gives up. Bytes held when the blackhole lifts are delivered,
//     in order, on the connections that are still open, as TCP retransmits
//     them after a partition heals.
//   - Refuse closes new connections as soon as they are accepted, as a
//     server that is down does.
//
// A proxy owns every goroutine it starts and joins them all in Close, so a
// test can check that nothing leaks. An EOF or error in either direction
// closes both sides of that connection; half-closed connections are not
// kept.
//
//	p, err := faultproxy.New("127.0.0.1:5672")
//	...
//	defer p.Close()
//	conn, err := amqp.Dial(p.URL("amqp://guest:guest@localhost:5672/"))
//	p.Cut() // conn's NotifyClose fires
package faultproxy
