package fleet

import "syscall"

// childProcAttr has the kernel send SIGTERM to a Python service when this
// process dies, so a demo or test killed outright leaves no service
// behind: SIGTERM is the service's own clean stop.
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
