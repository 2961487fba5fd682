package call

import (
	"cmp"
	"encoding/json"
	"html/template"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// channels holds every Connection from Connect that is not closed, for Channels.
var channels struct {
	sync.Mutex
	m map[*client]struct{}
}

func registerChannel(c *client) {
	channels.Lock()
	defer channels.Unlock()
	if channels.m == nil {
		channels.m = map[*client]struct{}{}
	}
	channels.m[c] = struct{}{}
}

func unregisterChannel(c *client) {
	channels.Lock()
	defer channels.Unlock()
	delete(channels.m, c)
}

// Channels returns the status of every Connection from [Connect] in the process that is not
// closed, ordered by name.
func Channels() []ConnectionStatus {
	channels.Lock()
	cs := make([]*client, 0, len(channels.m))
	for c := range channels.m {
		cs = append(cs, c)
	}
	channels.Unlock()
	out := make([]ConnectionStatus, 0, len(cs))
	for _, c := range cs {
		if st := c.Status(); !st.Closed {
			out = append(out, st)
		}
	}
	slices.SortStableFunc(out, func(a, b ConnectionStatus) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// ChannelsHandler returns an http.Handler that shows every Connection of the process
// ([Channels]): its target, health, resolved endpoints with their state, health, ejection,
// connections, in-flight calls, load, counters and recent errors. It serves HTML, or JSON when
// the request has format=json in its query or asks for application/json. Every value is
// escaped; no metadata or payload is ever shown.
func ChannelsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		view := channelsView(Channels(), time.Now())
		w.Header().Set("Cache-Control", "no-store")
		if r.URL.Query().Get("format") == "json" || strings.Contains(r.Header.Get("Accept"), "application/json") {
			w.Header().Set("Content-Type", "application/json")
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			enc.Encode(view)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		channelsPage.Execute(w, view)
	})
}

// ChannelJSON is how [ChannelsHandler] shows a Connection in JSON.
type ChannelJSON struct {
	Name       string         `json:"name"`
	Resolved   bool           `json:"resolved"`
	ResolveErr string         `json:"resolve_error,omitempty"`
	Healthy    bool           `json:"healthy"`
	Degraded   bool           `json:"degraded"`
	Wanted     int            `json:"wanted_connections"`
	Endpoints  []EndpointJSON `json:"endpoints"`
}

// EndpointJSON is how [ChannelsHandler] shows an endpoint in JSON.
type EndpointJSON struct {
	Address      string   `json:"address"`
	State        string   `json:"state"`
	Healthy      bool     `json:"healthy"`
	Ejected      bool     `json:"ejected"`
	EjectedFor   string   `json:"ejected_for,omitempty"`
	Ejections    int      `json:"ejections"`
	Connections  int      `json:"connections"`
	Wanted       int      `json:"wanted"`
	InFlight     int      `json:"in_flight"`
	Load         float64  `json:"load"`
	RTT          string   `json:"rtt,omitempty"`
	Calls        uint64   `json:"calls"`
	Errors       uint64   `json:"errors"`
	Err          string   `json:"error,omitempty"`
	RecentErrors []string `json:"recent_errors,omitempty"`
}

func channelsView(sts []ConnectionStatus, now time.Time) []ChannelJSON {
	out := make([]ChannelJSON, 0, len(sts))
	for _, st := range sts {
		ch := ChannelJSON{Name: st.Name, Resolved: st.Resolved, ResolveErr: errString(st.ResolveErr),
			Healthy: st.Healthy, Degraded: st.Degraded, Wanted: st.Wanted, Endpoints: []EndpointJSON{}}
		for _, e := range st.Endpoints {
			ej := EndpointJSON{Address: e.Address, State: e.State.String(), Healthy: e.Healthy, Ejected: e.Ejected,
				Ejections: e.Ejections, Connections: e.Connections, Wanted: e.Wanted, InFlight: e.InFlight,
				Load: e.Load, Calls: e.Calls, Errors: e.Errors, Err: errString(e.Err)}
			if e.Ejected {
				ej.EjectedFor = max(e.EjectedUntil.Sub(now), 0).Round(time.Millisecond).String()
			}
			if e.RTT > 0 {
				ej.RTT = e.RTT.String()
			}
			for _, re := range e.RecentErrors {
				ej.RecentErrors = append(ej.RecentErrors, re.Time.UTC().Format(time.RFC3339Nano)+" "+errString(re.Err))
			}
			ch.Endpoints = append(ch.Endpoints, ej)
		}
		out = append(out, ch)
	}
	return out
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

var channelsPage = template.Must(template.New("channels").Parse(`<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>weft channels</title>
<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}.bad{color:#b00}</style>
</head><body><h1>weft channels</h1>
{{if not .}}<p>No open channels.</p>{{end}}
{{range .}}<h2>{{.Name}}</h2>
<p>{{if .Healthy}}healthy{{else}}<span class="bad">unhealthy</span>{{end}}{{if .Degraded}}, <span class="bad">degraded</span>{{end}};
{{if .Resolved}}resolved{{else}}not resolved yet{{end}}{{with .ResolveErr}}; <span class="bad">resolver: {{.}}</span>{{end}};
{{.Wanted}} connections wanted</p>
<table><tr><th>endpoint</th><th>state</th><th>healthy</th><th>ejected</th><th>conns</th><th>in flight</th><th>load</th><th>rtt</th><th>calls</th><th>errors</th><th>recent errors</th></tr>
{{range .Endpoints}}<tr><td>{{.Address}}</td><td>{{.State}}</td><td>{{.Healthy}}</td><td>{{if .Ejected}}for {{.EjectedFor}}{{end}} ({{.Ejections}})</td><td>{{.Connections}}/{{.Wanted}}</td><td>{{.InFlight}}</td><td>{{.Load}}</td><td>{{.RTT}}</td><td>{{.Calls}}</td><td>{{.Errors}}</td><td>{{with .Err}}<div class="bad">{{.}}</div>{{end}}{{range .RecentErrors}}<div>{{.}}</div>{{end}}</td></tr>
{{end}}</table>
{{end}}</body></html>
`))
