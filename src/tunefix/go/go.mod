module tunefix/ollamarender

go 1.19
